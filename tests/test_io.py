"""Image I/O: formats and modes, hostile files, atomic writes, metadata."""

from __future__ import annotations

import io as io_module
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from facecloak.donors import remove_donors
from facecloak.errors import DonorBankError, ImageReadError, ImageWriteError, InvalidInputError
from facecloak.io import (
    HEIF_AVAILABLE,
    collect_images,
    for_output,
    jpeg_roundtrip,
    jpeg_roundtrip_changed,
    max_pixels_default,
    output_path,
    probe_image,
    read_image,
    strip_location,
    write_image,
)
from facecloak.io.read import rgb_pixels

GPS_IFD = 0x8825


def gradient(width: int = 64, height: int = 48) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], -1).astype(np.uint8)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb never gets decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    )


class TestRead:
    def test_rgb_jpeg_sample(self, samples_dir):
        image = read_image(samples_dir / "astronaut.jpg")
        assert image.pixels.shape == (3, 512, 512)
        assert image.pixels.dtype == torch.float32
        assert 0.0 <= float(image.pixels.min()) and float(image.pixels.max()) <= 1.0
        assert image.format == "JPEG" and image.alpha is None and not image.grayscale

    @pytest.mark.parametrize(
        "suffix,fmt", [(".png", "PNG"), (".bmp", "BMP"), (".tif", "TIFF"), (".webp", "WEBP")]
    )
    def test_lossless_formats_roundtrip_exactly(self, tmp_path, suffix, fmt):
        array = gradient()
        source = tmp_path / f"in{suffix}"
        options = {"lossless": True} if fmt == "WEBP" else {}
        Image.fromarray(array).save(source, format=fmt, **options)
        image = read_image(source)
        assert image.format == fmt
        expected = torch.from_numpy(array).permute(2, 0, 1).float() / 255
        assert torch.equal(image.pixels, expected)

    @pytest.mark.parametrize("mode", ["RGB", "RGBA"])
    def test_a_lossless_webp_is_written_back_losslessly_and_a_lossy_one_lossy(self, tmp_path, mode):
        """A lossless WebP came back at quality 95: pixels far from any face changed by up to 16
        levels (the file a third of its size) without a word."""
        array = gradient(96, 80)
        photo = Image.fromarray(array).convert(mode)
        photo.save(tmp_path / "lossless.webp", lossless=True)
        photo.save(tmp_path / "lossy.webp", quality=80)
        for name, lossless in (("lossless", True), ("lossy", False)):
            image = read_image(tmp_path / f"{name}.webp")
            assert image.lossless is lossless
            edited = image.pixels.clone()
            edited[:, :8, :8] = 128 / 255  # "a face"
            write_image(tmp_path / f"{name}_out.webp", edited, source=image)
            back = read_image(tmp_path / f"{name}_out.webp")
            assert back.lossless is lossless
            assert torch.equal(back.pixels, edited) is lossless
        asked = read_image(tmp_path / "lossless.webp")
        write_image(tmp_path / "asked.webp", asked.pixels, source=asked, jpeg_quality=60)  # a quality chosen
        assert not read_image(tmp_path / "asked.webp").lossless

    def test_gif_first_frame(self, tmp_path):
        frames = [Image.new("P", (20, 10), i) for i in (3, 9)]
        for frame in frames:
            frame.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
        frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
        image = read_image(tmp_path / "a.gif")
        assert image.pixels.shape == (3, 10, 20)
        assert torch.allclose(image.pixels[:, 0, 0], torch.tensor([3, 252, 7]) / 255)

    def test_exif_orientation_is_applied(self, tmp_path):
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        Image.fromarray(gradient(64, 48)).save(tmp_path / "o.jpg", exif=exif.tobytes())
        assert read_image(tmp_path / "o.jpg").pixels.shape == (3, 64, 48)

    def test_cmyk_becomes_rgb(self, tmp_path):
        Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
        pixels = read_image(tmp_path / "c.jpg").pixels
        assert pixels.shape == (3, 8, 8)
        red, green, blue = pixels[:, 4, 4].tolist()
        assert red > 0.9 and green < 0.1 and blue < 0.1

    def test_palette_with_transparency_keeps_alpha(self, tmp_path):
        image = Image.new("P", (10, 10), 1)
        image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
        image.info["transparency"] = 0
        image.paste(0, (0, 0, 5, 10))
        image.save(tmp_path / "p.png", transparency=0)
        loaded = read_image(tmp_path / "p.png")
        assert loaded.alpha is not None
        assert float(loaded.alpha[0, 0, 0]) == 0.0 and float(loaded.alpha[0, 0, 9]) == 1.0
        assert torch.allclose(loaded.pixels[:, 0, 9], torch.tensor([200, 100, 50]) / 255)

    def test_sixteen_bit_grey(self, tmp_path):
        values = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)
        Image.fromarray(values).save(tmp_path / "g16.png")
        loaded = read_image(tmp_path / "g16.png")
        assert loaded.grayscale
        assert loaded.pixels.shape == (3, 16, 16)
        assert torch.allclose(
            loaded.pixels[0], torch.from_numpy(values.astype(np.float32) / 65535), atol=1e-6
        )
        assert torch.equal(loaded.pixels[0], loaded.pixels[2])

    @pytest.mark.parametrize("white", [1.0, 255.0, 65535.0])
    def test_float_grey_in_any_range_keeps_its_levels(self, tmp_path, white):
        values = np.arange(16 * 16, dtype=np.float32).reshape(16, 16) / 255.0  # 0 to 1
        Image.fromarray(values * white, mode="F").save(tmp_path / "f.tif")
        loaded = read_image(tmp_path / "f.tif")
        assert loaded.grayscale
        assert torch.allclose(loaded.pixels[1], torch.from_numpy(values), atol=1e-6)

    def test_32_bit_integer_grey_of_8_bit_values_keeps_its_levels(self, tmp_path):
        """A TIFF of PIL mode "I" (e.g. ``convert("I")`` of a grey photo) holds 0-255: read as
        16-bit it came out nearly black (mean level 0.001), with no face to find."""
        values = np.arange(16 * 16, dtype=np.int32).reshape(16, 16) % 256
        Image.fromarray(values, mode="I").save(tmp_path / "i.tif")
        loaded = read_image(tmp_path / "i.tif")
        assert loaded.grayscale
        assert torch.allclose(loaded.pixels[0], torch.from_numpy(values / 255.0).float(), atol=1e-6)

    def test_a_float_grey_photo_with_no_data_pixels_keeps_its_levels(self, tmp_path, samples_dir):
        """A NaN or infinite pixel (no data) set the float image's white: the whole face came
        out black (levels / 65535) and the NaN went on into the tensor."""
        with Image.open(samples_dir / "grace_hopper.jpg") as photo:
            levels = np.asarray(photo.convert("L"), dtype=np.float32) / 255.0
        stored = levels.copy()
        stored[0, 0], stored[0, 1] = np.nan, np.inf
        Image.fromarray(stored, mode="F").save(tmp_path / "f.tif")
        loaded = read_image(tmp_path / "f.tif")
        assert not loaded.pixels.isnan().any()
        assert float(loaded.pixels[0, 0, 1]) == 1.0  # +inf is as white as it gets
        assert torch.allclose(loaded.pixels[1, 1:], torch.from_numpy(levels[1:]), atol=1e-6)

    @pytest.mark.parametrize("mode", ["I;16", "F"])
    def test_a_min_is_white_tiff_of_any_depth_is_not_read_as_a_negative(self, tmp_path, samples_dir, mode):
        """PhotometricInterpretation 0 (0 is white): PIL undoes it for 8-bit grey only."""
        with Image.open(samples_dir / "grace_hopper.jpg") as photo:
            levels = np.asarray(photo.convert("L"), dtype=np.float32) / 255.0
        stored = (1.0 - levels) * 65535 if mode == "I;16" else 1.0 - levels
        Image.fromarray(stored.astype(np.uint16 if mode == "I;16" else np.float32)).save(
            tmp_path / "w.tif", tiffinfo={262: 0}
        )
        loaded = read_image(tmp_path / "w.tif")
        assert torch.allclose(loaded.pixels[0], torch.from_numpy(levels), atol=1e-4)

    def test_a_grey_tiff_with_premultiplied_alpha_is_read_not_a_crash(self, tmp_path, samples_dir):
        """PIL's mode "La" names its alpha band "a": asking for "A" raised a ValueError that
        stopped the whole batch with a traceback."""
        with Image.open(samples_dir / "grace_hopper.jpg") as photo:
            grey = np.asarray(photo.convert("L").resize((64, 48)))
        alpha = np.full_like(grey, 128)
        buffer = io_module.BytesIO()
        Image.fromarray(np.dstack([grey, alpha]), "LA").save(buffer, format="TIFF")
        data = buffer.getvalue()
        extra_samples = bytes.fromhex("5201030001000000")  # tag 338, SHORT, 1 value, then 2
        at = data.index(extra_samples) + len(extra_samples)
        (tmp_path / "la.tif").write_bytes(data[:at] + b"\x01\x00" + data[at + 2 :])  # 1: associated
        with Image.open(tmp_path / "la.tif") as stored:
            assert stored.mode == "La"
            expected = np.asarray(stored.convert("LA"))[..., 0] / 255.0
        loaded = read_image(tmp_path / "la.tif")
        assert loaded.grayscale and loaded.alpha is not None
        assert torch.allclose(loaded.alpha, torch.full((1, 48, 64), 128 / 255))
        assert torch.allclose(loaded.pixels[0], torch.from_numpy(expected).float(), atol=1e-6)

    @pytest.mark.parametrize("mode", ["L", "RGB", "I;16"])
    def test_png_transparent_level_or_colour_keeps_alpha(self, tmp_path, mode):
        """A grey, 16-bit grey or RGB PNG's tRNS chunk makes one value transparent: it must come
        through as alpha (it was dropped, and the output was opaque)."""
        rgb = gradient()
        if mode == "RGB":
            image, key = Image.fromarray(rgb), tuple(int(v) for v in rgb[0, 0])
            transparent = (rgb == rgb[0, 0]).all(2)
        else:
            grey = rgb[..., 0] if mode == "L" else rgb[..., 0].astype(np.uint16) * 257
            image, key, transparent = Image.fromarray(grey), int(grey[0, 0]), grey == grey[0, 0]
        image.save(tmp_path / "t.png", transparency=key)
        assert Image.open(tmp_path / "t.png").mode == mode
        loaded = read_image(tmp_path / "t.png")
        assert loaded.alpha is not None
        assert torch.equal(loaded.alpha[0] == 0, torch.from_numpy(transparent))
        write_image(tmp_path / "out.png", loaded.pixels, source=loaded)
        with Image.open(tmp_path / "out.png") as written:
            alpha = np.asarray(written.convert("RGBA"))[..., 3]
        assert np.array_equal(alpha == 0, transparent)

    def test_grey_and_rgba(self, tmp_path):
        Image.fromarray(gradient()[..., 0]).save(tmp_path / "g.png")
        grey = read_image(tmp_path / "g.png")
        assert grey.grayscale and torch.equal(grey.pixels[0], grey.pixels[1])
        rgba = np.dstack([gradient(), np.full((48, 64), 128, np.uint8)])
        Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
        loaded = read_image(tmp_path / "a.png")
        assert loaded.alpha is not None and torch.allclose(loaded.alpha, torch.full((1, 48, 64), 128 / 255))

    @pytest.mark.skipif(not HEIF_AVAILABLE, reason="pillow-heif (the heic extra) not installed")
    def test_heic(self, tmp_path):
        Image.fromarray(gradient()).save(tmp_path / "h.heic", quality=95)
        loaded = read_image(tmp_path / "h.heic")
        assert loaded.pixels.shape == (3, 48, 64)
        assert (
            float((loaded.pixels - torch.from_numpy(gradient()).permute(2, 0, 1) / 255).abs().mean()) < 0.03
        )


class TestHostile:
    def test_missing(self, tmp_path):
        with pytest.raises(ImageReadError, match="no such file"):
            read_image(tmp_path / "nope.jpg")

    def test_a_dash_says_standard_input_is_not_read(self, tmp_path, monkeypatch):
        """``facecloak anonymize - < photo.jpg`` said "-: no such file or folder"."""
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ImageReadError, match="standard input is not read"):
            read_image("-")

    def test_zero_bytes(self, tmp_path):
        (tmp_path / "zero.jpg").write_bytes(b"")
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / "zero.jpg")
        assert str(info.value) == f"{tmp_path / 'zero.jpg'}: empty file (0 bytes)"

    def test_truncated_jpeg(self, tmp_path, samples_dir):
        data = (samples_dir / "astronaut.jpg").read_bytes()
        (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
        with pytest.raises(ImageReadError, match="truncated or corrupt"):
            read_image(tmp_path / "cut.jpg")

    def test_not_an_image(self, tmp_path):
        (tmp_path / "text.png").write_text("hello, I am not a PNG\n" * 10)
        with pytest.raises(ImageReadError, match="not an image"):
            read_image(tmp_path / "text.png")

    def test_decompression_bomb(self, tmp_path):
        png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
        with pytest.raises(ImageReadError, match="more pixels than the limit|more than the limit") as info:
            read_image(tmp_path / "bomb.png")
        assert "\n" not in str(info.value) and "bomb.png" in str(info.value)

    def test_limit_is_configurable(self, samples_dir, monkeypatch):
        with pytest.raises(ImageReadError, match="more than the limit of 1,000"):
            read_image(samples_dir / "astronaut.jpg", max_pixels=1000)
        monkeypatch.setenv("FACECLOAK_MAX_PIXELS", "2000")
        with pytest.raises(ImageReadError, match="2,000"):
            read_image(samples_dir / "astronaut.jpg")

    @pytest.mark.parametrize("value", ["1e8", "100_000_000", " 100000000 "])
    def test_limit_from_the_environment_in_any_whole_number_spelling(self, value, monkeypatch):
        monkeypatch.setenv("FACECLOAK_MAX_PIXELS", value)
        assert max_pixels_default() == 100_000_000

    @pytest.mark.parametrize("value", ["lots", "1.5e3x", "0", "-5", "2.5", "nan"])
    def test_bad_limit_in_the_environment_is_one_line_naming_it(self, value, samples_dir, monkeypatch):
        """FACECLOAK_MAX_PIXELS=1e8 (or a typo) crashed every read with a bare int() ValueError."""
        monkeypatch.setenv("FACECLOAK_MAX_PIXELS", value)
        with pytest.raises(InvalidInputError, match="FACECLOAK_MAX_PIXELS must be a whole number") as caught:
            read_image(samples_dir / "astronaut.jpg")
        assert "\n" not in str(caught.value)

    def test_pil_guard_is_restored_after_a_read(self, samples_dir, tmp_path):
        """PIL's process-wide limits are raised for a read only, and never set at import."""
        from PIL import ImageFile

        before = Image.MAX_IMAGE_PIXELS
        read_image(samples_dir / "astronaut.jpg", max_pixels=10 * (before or 1))
        png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
        with pytest.raises(ImageReadError):
            read_image(tmp_path / "bomb.png", max_pixels=10 * (before or 1))
        assert Image.MAX_IMAGE_PIXELS == before
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    def test_directory_with_image_name(self, tmp_path):
        (tmp_path / "folder.jpg").mkdir()
        with pytest.raises(ImageReadError, match="not a regular file"):
            read_image(tmp_path / "folder.jpg")


class TestWrite:
    def test_png_roundtrip_is_lossless(self, tmp_path):
        pixels = torch.from_numpy(gradient()).permute(2, 0, 1).float() / 255
        write_image(tmp_path / "out.png", pixels)
        assert torch.equal(read_image(tmp_path / "out.png").pixels, pixels)

    def test_alpha_is_put_back(self, tmp_path):
        rgba = np.dstack([gradient(), np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))])
        Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
        source = read_image(tmp_path / "a.png")
        write_image(tmp_path / "b.png", source.pixels, source=source)
        with Image.open(tmp_path / "b.png") as written:
            assert written.mode == "RGBA"
            assert np.array_equal(np.asarray(written), rgba)

    def test_never_overwrites_an_input(self, tmp_path, samples_dir):
        source = tmp_path / "in.png"
        Image.fromarray(gradient()).save(source)
        before = source.read_bytes()
        with pytest.raises(ImageWriteError, match="refusing to overwrite an input"):
            write_image(source, torch.zeros(3, 4, 4), protected=[source], overwrite=True)
        assert source.read_bytes() == before

    def test_never_overwrites_the_source_photo_even_with_overwrite(self, tmp_path, samples_dir):
        """``source`` is an input: written back onto its own file, the original was replaced."""
        photo = tmp_path / "astronaut.jpg"
        photo.write_bytes((samples_dir / "astronaut.jpg").read_bytes())
        (tmp_path / "link.jpg").symlink_to(photo)
        before = photo.read_bytes()
        image = read_image(photo)
        for target in (photo, tmp_path / "link.jpg"):
            with pytest.raises(ImageWriteError, match="refusing to overwrite an input"):
                write_image(target, torch.zeros_like(image.pixels), source=image, overwrite=True)
        assert photo.read_bytes() == before

    def test_existing_output_needs_overwrite(self, tmp_path):
        target = tmp_path / "o.png"
        write_image(target, torch.zeros(3, 4, 4))
        with pytest.raises(ImageWriteError, match="output exists"):
            write_image(target, torch.ones(3, 4, 4))
        write_image(target, torch.ones(3, 4, 4), overwrite=True)
        assert float(read_image(target).pixels.min()) == 1.0

    def test_failed_write_leaves_nothing(self, tmp_path):
        with pytest.raises(InvalidInputError):  # not (3, H, W): the caller's mistake, not the file's
            write_image(tmp_path / "bad.png", torch.zeros(4, 4))
        with pytest.raises(ImageWriteError, match="cannot write"):
            write_image(tmp_path / "bad.xyz", torch.zeros(3, 4, 4))
        assert list(tmp_path.iterdir()) == []

    def test_gps_dropped_by_default_and_when_keeping_metadata(self, tmp_path):
        exif = Image.Exif()
        exif[0x010F] = "FaceCam"  # Make
        exif[GPS_IFD] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}
        Image.fromarray(gradient()).save(tmp_path / "gps.jpg", exif=exif.tobytes())
        source = read_image(tmp_path / "gps.jpg")
        assert GPS_IFD in Image.open(tmp_path / "gps.jpg").getexif()

        write_image(tmp_path / "plain.jpg", source.pixels, source=source)
        assert len(Image.open(tmp_path / "plain.jpg").getexif()) == 0

        write_image(tmp_path / "kept.jpg", source.pixels, source=source, keep_metadata=True)
        kept = Image.open(tmp_path / "kept.jpg").getexif()
        assert kept.get(0x010F) == "FaceCam"
        assert GPS_IFD not in kept
        assert GPS_IFD not in _exif_of(strip_location(source.exif))

    @pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif", ".webp"])
    def test_kept_metadata_never_carries_a_preview_of_the_original(self, tmp_path, samples_dir, suffix):
        """Cameras store preview JPEGs in the maker note and a thumbnail in IFD1: with
        ``keep_metadata`` the protected file must hold neither (they show the unprotected face)."""
        face = Image.open(samples_dir / "astronaut.jpg")
        buffer = io_module.BytesIO()
        face.resize((160, 160)).save(buffer, "JPEG", quality=80)
        preview = buffer.getvalue()
        source_path = tmp_path / "camera.jpg"
        face.save(source_path, exif=_exif_with_previews(preview), quality=92)
        assert open(source_path, "rb").read().count(b"\xff\xd8\xff") == 3  # the photo and two previews
        assert len(Image.open(source_path).getexif().get_ifd(0x8769)[0x927C]) == len(preview)

        source = read_image(source_path)
        out = tmp_path / f"kept{suffix}"
        write_image(out, source.pixels, source=source, keep_metadata=True)
        kept = Image.open(out).getexif()
        assert kept.get(0x010F) == "Cam"  # the rest of the EXIF is kept
        assert 0x927C not in kept.get_ifd(0x8769)
        data = out.read_bytes()
        assert preview[-200:] not in data
        if suffix != ".tif":  # an uncompressed TIFF's pixels can hold these three bytes by chance
            assert data.count(b"\xff\xd8\xff") == (1 if suffix == ".jpg" else 0)

    @pytest.mark.parametrize("suffix", [".jpg", ".png"])
    def test_kept_metadata_drops_a_preview_under_any_tag(self, tmp_path, samples_dir, suffix):
        """A preview of the photo in the main directory's DNGPrivateData, a misplaced maker note or
        a private tag of the Exif directory was kept with ``keep_metadata``: the unprotected face."""
        face = Image.open(samples_dir / "astronaut.jpg")
        buffer = io_module.BytesIO()
        face.resize((160, 160)).save(buffer, "JPEG", quality=80)
        preview = buffer.getvalue()
        exif = Image.Exif()
        exif[0x010F] = "Cam"
        exif[0xC634] = b"Adobe\x00MakN" + preview  # DNGPrivateData
        exif[0x927C] = preview  # a maker note where it does not belong
        exif.get_ifd(0x8769)[0x9003] = "2024:01:02 03:04:05"
        exif.get_ifd(0x8769)[0xC000] = b"private" + preview  # an unknown private tag
        face.save(tmp_path / "camera.jpg", exif=exif.tobytes(), quality=92)
        source = read_image(tmp_path / "camera.jpg")
        write_image(tmp_path / f"kept{suffix}", source.pixels, source=source, keep_metadata=True)
        data = (tmp_path / f"kept{suffix}").read_bytes()
        assert preview[-300:] not in data
        kept = Image.open(tmp_path / f"kept{suffix}").getexif()
        assert kept.get(0x010F) == "Cam" and kept.get_ifd(0x8769).get(0x9003) == "2024:01:02 03:04:05"

    def test_kept_camera_exif_in_a_tiff_keeps_its_exif_directory_and_drops_gps(self, tmp_path):
        """A camera's EXIF has an Exif directory (exposure, date): libtiff could not write it, and
        ``--keep-metadata --format tif`` failed on every camera photo with a RuntimeError."""
        exif = Image.Exif()
        exif[0x010F] = "FaceCam"
        exif[GPS_IFD] = {1: "N", 2: (48.0, 51.0, 24.0)}
        exif.get_ifd(0x8769)[0x9003] = "2024:01:02 03:04:05"  # DateTimeOriginal
        Image.fromarray(gradient()).save(tmp_path / "cam.jpg", exif=exif.tobytes())
        source = read_image(tmp_path / "cam.jpg")
        write_image(tmp_path / "kept.tif", source.pixels, source=source, keep_metadata=True)
        with Image.open(tmp_path / "kept.tif") as written:
            kept = written.getexif()
            assert torch.equal(rgb_pixels(written), source.pixels)  # lossless
        assert kept.get(0x010F) == "FaceCam"
        assert kept.get_ifd(0x8769).get(0x9003) == "2024:01:02 03:04:05"
        assert GPS_IFD not in kept and b"GPS" not in (tmp_path / "kept.tif").read_bytes()
        write_image(tmp_path / "plain.tif", source.pixels, source=source)
        assert 0x010F not in Image.open(tmp_path / "plain.tif").getexif()

    def test_icc_profile_is_kept(self, tmp_path):
        profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        Image.fromarray(gradient()).save(tmp_path / "icc.png", icc_profile=profile)
        source = read_image(tmp_path / "icc.png")
        write_image(tmp_path / "out.jpg", source.pixels, source=source)
        assert Image.open(tmp_path / "out.jpg").info.get("icc_profile") == profile

    @pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif", ".webp"])
    def test_grey_profile_is_not_put_on_a_colour_output(self, tmp_path, suffix):
        """A grey photo's ICC profile describes one channel: an output with colour added that kept
        it could not be colour-managed ("cannot build transform") and showed wrongly."""
        grey = gradient()[..., 0]
        Image.fromarray(grey).save(tmp_path / "g.jpg", icc_profile=_grey_profile(), quality=95)
        source = read_image(tmp_path / "g.jpg")
        assert source.grayscale and source.icc_profile == _grey_profile()
        coloured = source.pixels.clone()
        coloured[0, 10:20, 10:20] = 1.0  # a red patch
        write_image(tmp_path / f"colour{suffix}", coloured, source=source)
        with Image.open(tmp_path / f"colour{suffix}") as written:
            assert written.mode == "RGB"
            icc = written.info.get("icc_profile")
            if icc:  # whatever it carries must describe RGB
                assert ImageCms.ImageCmsProfile(io_module.BytesIO(icc)).profile.xcolor_space == "RGB "
        write_image(tmp_path / f"grey{suffix}", source.pixels, source=source)  # still grey: kept
        with Image.open(tmp_path / f"grey{suffix}") as written:  # WebP has no grey mode
            assert written.mode == ("RGB" if suffix == ".webp" else "L")
            assert written.info.get("icc_profile") == (None if suffix == ".webp" else _grey_profile())


def _grey_profile() -> bytes:
    """A minimal ICC v2 grey profile (description, white point, gamma 2.2 curve, copyright)."""

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    d50 = s15(0.9642) + s15(1.0) + s15(0.8249)
    tags = [
        (b"desc", b"desc" + bytes(4) + struct.pack(">I", 5) + b"grey\0" + bytes(4 + 4 + 3 + 67)),
        (b"wtpt", b"XYZ " + bytes(4) + d50),
        (b"kTRC", b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0233) + bytes(2)),
        (b"cprt", b"text" + bytes(4) + b"none\0"),
    ]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (
        struct.pack(">I", offset + len(body))
        + b"lcms"
        + bytes([2, 0x10, 0, 0])
        + b"mntrGRAYXYZ "
        + bytes(12)
        + b"acspAPPL"
        + bytes(24)
        + d50
        + bytes(48)
    )
    return header + struct.pack(">I", len(tags)) + table + body


def _exif_with_previews(preview: bytes) -> bytes:
    """Little-endian EXIF whose maker note is ``preview`` (a JPEG) and whose IFD1 is its thumbnail."""

    def directory(entries: list[tuple[int, int, int, bytes]], following: int) -> bytes:
        body = b"".join(struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries)
        return struct.pack("<H", len(entries)) + body + struct.pack("<I", following)

    # IFD0 at 8 (Make, the Exif pointer; 30 bytes), the Exif IFD at 38 (the maker note; 18 bytes),
    # IFD1 at 56 (the thumbnail's offset and length; 30 bytes), then the two copies of the preview
    maker_note_at, thumbnail_at = 86, 86 + len(preview)
    first = directory([(0x010F, 2, 4, b"Cam\x00"), (0x8769, 4, 1, struct.pack("<I", 38))], 56)
    exif_ifd = directory([(0x927C, 7, len(preview), struct.pack("<I", maker_note_at))], 0)
    thumbnail = directory(
        [(0x0201, 4, 1, struct.pack("<I", thumbnail_at)), (0x0202, 4, 1, struct.pack("<I", len(preview)))], 0
    )
    tiff = b"II*\x00" + struct.pack("<I", 8) + first + exif_ifd + thumbnail + preview + preview
    return b"Exif\x00\x00" + tiff


def _exif_of(data: bytes) -> Image.Exif:
    exif = Image.Exif()
    exif.load(data)
    return exif


def _big_exif(size: int = 70_000) -> bytes:
    """EXIF larger than a JPEG's one 64 KB segment holds (a PNG, WebP or HEIC may carry it)."""
    exif = Image.Exif()
    exif[0x010F] = "FaceCam"  # Make
    exif[0x010E] = "x" * size  # ImageDescription
    return exif.tobytes()


class TestWhatTheOutputCannotHold:
    """An output that lacks what its input had says so; the protected photo is always written."""

    @pytest.mark.parametrize("suffix", [".gif", ".webp", ".tif", ".png"])
    def test_an_animation_or_multi_page_file_says_only_its_first_frame_is_written(self, tmp_path, suffix):
        """Frames past the first were dropped from the output without a word."""
        frames = [Image.fromarray(np.roll(gradient(), k * 7, axis=1)) for k in range(3)]
        frames[0].save(tmp_path / f"a{suffix}", save_all=True, append_images=frames[1:])
        image = read_image(tmp_path / f"a{suffix}")
        assert image.frames == 3
        info: dict = {}
        write_image(tmp_path / "out.png", image.pixels, source=image, info=info)
        assert info["frames_in_source"] == 3 and info["frames_written"] == 1
        assert "only the first of 3 frames was protected and written" in info["notes"][0]
        assert getattr(Image.open(tmp_path / "out.png"), "n_frames", 1) == 1
        frames[0].save(tmp_path / f"still{suffix}")
        still, info = read_image(tmp_path / f"still{suffix}"), {}
        write_image(tmp_path / "still_out.png", still.pixels, source=still, info=info)
        assert still.frames == 1 and "frames_in_source" not in info and "notes" not in info

    @pytest.mark.parametrize("suffix", [".jpg", ".bmp"])
    def test_transparency_is_composited_onto_white_for_a_format_without_alpha(self, tmp_path, suffix):
        """A transparent PNG written as JPEG or BMP showed what lay under the alpha: black here."""
        rgba = np.dstack([gradient(), np.full((48, 64), 255, np.uint8)])
        rgba[:, :20] = 0  # transparent black, as most editors store a cut-out's background
        rgba[:, 20:30, 3] = 128  # half transparent
        Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
        image = read_image(tmp_path / "cut.png")
        info: dict = {}
        write_image(tmp_path / f"out{suffix}", image.pixels, source=image, info=info)
        written = np.asarray(Image.open(tmp_path / f"out{suffix}").convert("RGB")).astype(int)
        assert (written[:, :20] >= 250).all()  # white, not black
        expected = (rgba[:, 20:30, :3].astype(int) * 128 + 255 * 127 + 127) // 255
        assert np.abs(written[:, 20:30] - expected).max() <= 6
        assert np.abs(written[:, 30:] - rgba[:, 30:, :3]).max() <= 6  # opaque pixels as they were
        assert info["alpha_flattened"] == "white"
        assert any("transparency composited onto white" in note for note in info["notes"])
        # prepared before the protection, the same photo says so once written, and stays as it was
        flat = for_output(image, tmp_path / f"out{suffix}")
        assert flat.alpha is None and flat.flattened and float(flat.pixels[:, 0, 0].min()) == 1.0
        assert for_output(image, tmp_path / "out.png") is image  # PNG keeps its alpha
        info = {}
        write_image(tmp_path / f"flat{suffix}", flat.pixels, source=flat, info=info)
        assert info["alpha_flattened"] == "white"
        # an RGBA file with every pixel opaque loses nothing: it was said to lose its transparency
        Image.fromarray(np.dstack([gradient(), np.full((48, 64), 255, np.uint8)]), "RGBA").save(
            tmp_path / "o.png"
        )
        opaque = read_image(tmp_path / "o.png")
        assert not for_output(opaque, tmp_path / f"out{suffix}").flattened
        info = {}
        write_image(tmp_path / f"opaque{suffix}", opaque.pixels, source=opaque, info=info)
        assert "alpha_flattened" not in info and not info.get("notes")

    @pytest.mark.skipif(not HEIF_AVAILABLE, reason="pillow-heif not installed")
    def test_heic_keeps_transparency(self, tmp_path):
        rgba = np.dstack([gradient(), np.full((48, 64), 255, np.uint8)])
        rgba[:, :20, 3] = 0
        Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
        image = read_image(tmp_path / "cut.png")
        info: dict = {}
        write_image(tmp_path / "out.heic", image.pixels, source=image, info=info)
        assert "alpha_flattened" not in info and for_output(image, tmp_path / "out.heic") is image
        alpha = np.asarray(Image.open(tmp_path / "out.heic").convert("RGBA"))[..., 3]
        assert (alpha[:, :16] <= 5).all() and (alpha[:, 24:] >= 250).all()  # lossy at the edge

    @pytest.mark.parametrize("source_suffix", [".png", ".webp"])
    def test_exif_too_large_for_a_jpeg_is_left_out_not_the_photo(self, tmp_path, source_suffix):
        """--keep-metadata from a PNG with 70 KB of EXIF to .jpg failed: "EXIF data is too long"."""
        Image.fromarray(gradient()).save(tmp_path / f"big{source_suffix}", exif=_big_exif())
        image = read_image(tmp_path / f"big{source_suffix}")
        assert image.exif is not None and len(image.exif) > 65_535
        info: dict = {}
        write_image(tmp_path / "out.jpg", image.pixels, source=image, keep_metadata=True, info=info)
        assert len(Image.open(tmp_path / "out.jpg").getexif()) == 0
        assert "more than a JPEG's 65,533" in info["exif_dropped"]
        assert any(note.startswith("EXIF not kept") for note in info["notes"])
        info = {}  # a format that holds it keeps it
        write_image(tmp_path / "out.png", image.pixels, source=image, keep_metadata=True, info=info)
        assert Image.open(tmp_path / "out.png").getexif().get(0x010F) == "FaceCam"
        assert "exif_dropped" not in info

    def test_a_block_edited_jpeg_leaves_out_exif_too_large_but_keeps_its_orientation(self, tmp_path):
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(gradient(64, 48)).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=90)
        image = read_image(tmp_path / "o.jpg")
        image.exif = _big_exif()  # as if the camera's EXIF had grown past one segment
        info: dict = {}
        write_image(tmp_path / "out.jpg", image.pixels, source=image, keep_metadata=True, info=info)
        assert info["encoding"] == "jpeg-blocks" and "exif_dropped" in info
        written = Image.open(tmp_path / "out.jpg").getexif()
        assert written.get(0x0112) == 6 and 0x010F not in written


class TestPaths:
    def test_collect_mirrors_and_skips(self, tmp_path):
        (tmp_path / "in" / "sub").mkdir(parents=True)
        (tmp_path / "in" / "a.jpg").write_bytes(b"x")
        (tmp_path / "in" / "sub" / "b.PNG").write_bytes(b"x")
        (tmp_path / "in" / "notes.txt").write_text("hi")
        (tmp_path / "in" / "out").mkdir()
        (tmp_path / "in" / "out" / "old.jpg").write_bytes(b"x")
        jobs, skipped = collect_images([tmp_path / "in"], exclude=tmp_path / "in" / "out")
        assert [str(job.relative) for job in jobs] == ["a.jpg", "sub/b.PNG"]
        # a photo in the output folder that no journal there wrote is not read, but named
        assert [path.name for path, _ in skipped] == ["notes.txt", "old.jpg"]
        assert skipped[1][1].startswith("inside the output folder")
        target = output_path(jobs[1], tmp_path / "o", "cloaked", None, "PNG")
        assert target == tmp_path / "o" / "sub" / "b_cloaked.png"
        assert output_path(jobs[0], None, "anonymized", "png", "JPEG") == tmp_path / "in" / "a_anonymized.png"

    def test_hidden_photos_and_broken_links_are_named_not_dropped(self, tmp_path):
        """A photo in a hidden file or folder, or a link to a photo that is gone, went unsaid."""
        (tmp_path / ".hid").mkdir()
        (tmp_path / "a.jpg").write_bytes(b"x")
        (tmp_path / ".h.jpg").write_bytes(b"x")
        (tmp_path / ".hid" / "y.png").write_bytes(b"x")
        (tmp_path / ".hid" / "notes.txt").write_text("hi")  # not a photo: as before, not listed
        (tmp_path / ".facecloak-tmp123.jpg").write_bytes(b"x")  # our own write in progress
        (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
        jobs, skipped = collect_images([tmp_path])
        assert [job.path.name for job in jobs] == ["a.jpg"]
        reasons = {path.name: why for path, why in skipped}
        assert set(reasons) == {".h.jpg", "y.png", "gone.jpg"}, reasons
        assert reasons[".h.jpg"].startswith("hidden") and reasons["y.png"].startswith("hidden")
        assert "broken link" in reasons["gone.jpg"]
        # a pipe named like a photo was dropped without a word
        os.mkfifo(tmp_path / "pipe.jpg")
        jobs, skipped = collect_images([tmp_path])
        assert [job.path.name for job in jobs] == ["a.jpg"]
        assert dict((path.name, why) for path, why in skipped)["pipe.jpg"].startswith("not a regular file")

    def test_output_folder_equal_to_the_input_folder_is_walked(self, tmp_path):
        (tmp_path / "a.jpg").write_bytes(b"x")
        jobs, _ = collect_images([tmp_path], exclude=tmp_path)
        assert [job.path.name for job in jobs] == ["a.jpg"]

    def test_a_folder_given_as_dotdot_is_mirrored_under_its_own_name(self, tmp_path, monkeypatch):
        """``cloak .. other/ -o out`` wrote ``out/../photos/a_cloaked.png``: outside ``out``."""
        (tmp_path / "p" / "photos").mkdir(parents=True)
        (tmp_path / "other").mkdir()
        (tmp_path / "p" / "photos" / "a.jpg").write_bytes(b"x")
        (tmp_path / "other" / "b.jpg").write_bytes(b"x")
        monkeypatch.chdir(tmp_path / "p" / "photos")
        jobs, _ = collect_images([Path(".."), Path("../../other")])
        assert [str(job.relative) for job in jobs] == ["p/photos/a.jpg", "other/b.jpg"]
        target = output_path(jobs[0], tmp_path / "out", "blur", None, "JPEG")
        assert target.resolve().is_relative_to(tmp_path / "out")
        # "." among several is mirrored under its name too (it was put loose in out, beside other/)
        jobs, _ = collect_images([Path("."), Path("../../other")])
        assert [str(job.relative) for job in jobs] == ["photos/a.jpg", "other/b.jpg"]

    def test_a_second_path_to_a_photo_taken_is_named_not_dropped(self, tmp_path):
        """A symlink to a photo of the same folder (or one named twice) is one input, and said so."""
        (tmp_path / "a.jpg").write_bytes(b"x")
        (tmp_path / "link.jpg").symlink_to("a.jpg")
        jobs, skipped = collect_images([tmp_path])
        assert [job.path.name for job in jobs] == ["a.jpg"]
        assert skipped == [(tmp_path / "link.jpg", f"the same file as {tmp_path / 'a.jpg'}")]
        named = [tmp_path / "a.jpg", tmp_path / "a.jpg", tmp_path / "link.jpg"]
        jobs, skipped = collect_images(named)
        assert len(jobs) == 1 and [path.name for path, _ in skipped] == ["link.jpg"]

    def test_a_link_to_a_folder_is_named_not_silently_left(self, tmp_path):
        """rglob does not follow it: the photos under it were left without a word."""
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "b.jpg").write_bytes(b"x")
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "a.jpg").write_bytes(b"x")
        (tmp_path / "in" / "trip").symlink_to(tmp_path / "elsewhere")
        jobs, skipped = collect_images([tmp_path / "in"])
        assert [job.path.name for job in jobs] == ["a.jpg"]
        assert [(path.name, "not followed" in reason) for path, reason in skipped] == [("trip", True)]

    def test_an_input_format_facecloak_does_not_write_fails_naming_the_photo(self, tmp_path):
        (tmp_path / "scan.ppm").write_bytes(b"x")
        (job,), _ = collect_images([tmp_path / "scan.ppm"])
        with pytest.raises(ImageWriteError) as raised:
            output_path(job, None, "blur", None, "PPM")
        assert str(raised.value).startswith(f"{tmp_path / 'scan.ppm'}: ")
        assert "--format png" in str(raised.value)


class TestProbe:
    def test_format_from_the_header_alone(self, tmp_path, samples_dir):
        assert probe_image(samples_dir / "astronaut.jpg") == "JPEG"
        Image.fromarray(gradient()).save(tmp_path / "g.webp")
        assert probe_image(tmp_path / "g.webp") == "WEBP"

    def test_every_early_failure_is_one_line(self, tmp_path):
        (tmp_path / "empty.jpg").write_bytes(b"")
        (tmp_path / "text.png").write_text("hello")
        png_header_only(tmp_path / "bomb.png", 60_000, 60_000)
        cases = {
            tmp_path / "missing.jpg": "no such file or folder",
            tmp_path / "empty.jpg": "empty file",
            tmp_path / "text.png": "not an image",
            tmp_path / "bomb.png": "limit",
            tmp_path: "not a regular file",
        }
        for path, reason in cases.items():
            with pytest.raises(ImageReadError, match=reason):
                probe_image(path)


def test_protected_files_match_as_same_file_does(tmp_path):
    """A batch's inputs, looked at once: hard links and symlinks to one count; other files do not."""
    from facecloak.io import ProtectedFiles, same_file

    first, second = tmp_path / "a.jpg", tmp_path / "b.jpg"
    first.write_bytes(b"a")
    second.write_bytes(b"b")
    (tmp_path / "hard.jpg").hardlink_to(first)
    (tmp_path / "soft.jpg").symlink_to(first)
    protected = ProtectedFiles([first, tmp_path / "missing.jpg"])
    assert len(protected) == 1  # a path with no file protects nothing
    for name in ("a.jpg", "hard.jpg", "soft.jpg", "b.jpg", "missing.jpg", "new.jpg"):
        path = tmp_path / name
        assert (path in protected) == same_file(path, first), name
    assert str(first) in protected and 3 not in protected


@pytest.mark.parametrize(
    "boxes",
    [
        [],  # nothing changed
        [(37, 51, 301, 277)],  # one face-sized area off the coding grid
        [(0, 0, 100, 90), (1023, 587, 1100, 620)],  # two corners: windows clipped by the edges
        [(366, 155, 371, 158), (406, 175, 426, 225), (800, 5, 850, 60)],  # near areas merge
    ],
)
def test_a_partly_changed_photo_re_encodes_exactly_as_the_whole_photo(boxes) -> None:
    """The replacer's upload check re-encodes only around a try's faces: same pixels, to the bit."""
    original = read_image(Path(__file__).parents[1] / "samples" / "group.jpg").pixels  # 1100 x 620
    changed = original.clone()
    noise = torch.Generator().manual_seed(0)
    for x0, y0, x1, y1 in boxes:
        changed[:, y0:y1, x0:x1] = torch.rand(3, y1 - y0, x1 - x0, generator=noise)
    whole = jpeg_roundtrip(changed, 75)
    assert torch.equal(jpeg_roundtrip_changed(changed, original, jpeg_roundtrip(original, 75), 75), whole)
    if boxes:  # and the areas changed did change after the round trip (the test can fail)
        assert not torch.equal(whole, jpeg_roundtrip(original, 75))


def test_rgb_pixels_are_the_8_bit_levels_over_255_in_every_mode():
    """The torch conversion of a decoded photo gives exactly numpy's float values, as (3, H, W)."""
    from facecloak.io.read import rgb_pixels

    generator = np.random.default_rng(5)
    rgb = Image.fromarray(generator.integers(0, 256, (7, 5, 3), dtype=np.uint8), "RGB")
    for image in (rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P")):
        expected = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
        pixels = rgb_pixels(image)
        assert pixels.dtype == torch.float32 and pixels.shape == (3, 7, 5) and pixels.is_contiguous()
        assert torch.equal(pixels, torch.from_numpy(np.ascontiguousarray(expected)))


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Ctrl-C between the temporary file and its rename left a hidden ``.facecloak-*`` file
    beside the outputs (only an OSError cleaned up)."""
    import os

    from facecloak.io import write_bytes_atomic

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(tmp_path / "out.png", b"bytes")
    assert list(tmp_path.iterdir()) == []


def test_a_journal_below_a_folder_cannot_claim_photos_outside_its_own_folder(tmp_path, samples_dir):
    """A journal naming ``../a.jpg`` skipped a.jpg as an earlier output; a NUL in a name crashed the walk."""
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    shutil.copy(samples_dir / "grace_hopper.jpg", photos / "a.jpg")
    journal = photos / "sub" / ".facecloak-journal.jsonl"
    for output in ("../a.jpg", str(photos / "a.jpg"), "a\0.jpg"):
        record = {"event": "done", "input": "x.jpg", "sha256": "0", "settings": "0", "output": output}
        journal.write_text(json.dumps(record) + "\n")
        jobs, skipped = collect_images([photos])
        assert [job.path for job in jobs] == [photos / "a.jpg"], output
        assert skipped == []


def test_a_donor_id_that_is_a_path_is_refused_before_any_file_is_read_or_removed(tmp_path, monkeypatch):
    """Chips are named by donor id: a bank.json id '../../victim' made `donors remove` delete victim.png."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    bank = tmp_path / "bank"
    (bank / "chips").mkdir(parents=True)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"someone else's file")
    donor = {"id": "../../victim", "stats": [0] * 10, "chip_landmarks": [[0, 0]] * 5, "pose": [0, 0, 0]}
    (bank / "bank.json").write_text(json.dumps({"format": 1, "donors": [donor], "models": {}}))
    np.savez(bank / "embeddings.npz", ids=np.array(["../../victim"]))
    with pytest.raises(DonorBankError, match="not a plain name"):
        remove_donors(bank, ["../../victim"])
    assert victim.exists()


@pytest.mark.parametrize("exif", [b"Exif\x00\x00garbage!", b"Exif\x00\x00II*\x00"])
def test_damaged_exif_kept_with_keep_metadata_is_left_out_not_a_crash(tmp_path, samples_dir, exif):
    """A JPEG whose EXIF Pillow cannot parse stopped a --keep-metadata batch with a traceback."""
    data = (samples_dir / "grace_hopper.jpg").read_bytes()
    segment = b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif
    photo = tmp_path / "damaged.jpg"
    photo.write_bytes(data[:2] + segment + data[2:])
    source = read_image(photo)
    for name in ("out.jpg", "out.png"):
        info: dict = {}
        written = write_image(tmp_path / name, source.pixels, source=source, keep_metadata=True, info=info)
        assert any(note.startswith("EXIF not kept: damaged") for note in info["notes"])
        with Image.open(written) as opened:
            assert "exif" not in opened.info


def test_write_image_of_something_not_a_chw_float_tensor_is_a_usage_error(tmp_path):
    """A numpy array or a PIL image failed with an AttributeError deep in the 8-bit conversion, and
    an (H, W, 3) tensor as a file's error (exit 3) where the caller's mistake is a usage error."""
    for wrong, said in (
        (np.zeros((3, 4, 4), np.float32), "got ndarray"),
        (torch.zeros(4, 4, 3), "got shape (4, 4, 3)"),
        (torch.zeros(3, 4, 4, dtype=torch.uint8), "got a torch.uint8 tensor"),
    ):
        with pytest.raises(InvalidInputError, match=r"pixels must be a \(3, H, W\) float") as caught:
            write_image(tmp_path / "x.png", wrong)
        assert said in str(caught.value) and "\n" not in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_a_photo_wider_than_a_jpeg_allows_is_refused_saying_so():
    """A 66,000 px wide panorama asked back as JPEG failed as "could not encode (broken data
    stream when writing image file)", naming neither the limit nor the way out."""
    from facecloak.io.write import encode_image

    with pytest.raises(ImageWriteError, match=r"at most 65,500 pixels a side.*66000 x 16.*PNG"):
        encode_image(torch.zeros(3, 16, 66_000), "JPEG")
    assert encode_image(torch.zeros(3, 16, 600), "JPEG")[:2] == b"\xff\xd8"


def test_a_photo_over_pils_own_pixel_guard_is_still_recognised_in_its_earlier_output(
    tmp_path, samples_dir, monkeypatch
):
    """`looks_like` opened both files under PIL's guard (89 MP, an error over 179 MP) rather than
    facecloak's: a photo the batch reads (FACECLOAK_MAX_PIXELS raised) was never its own output's
    photo, and ``--overwrite`` then failed it as "an input too". PIL's guard lowered under the
    photo's 512 x 600 stands in for a 200 MP photo."""
    import warnings

    from facecloak.io import looks_like

    photo = samples_dir / "grace_hopper.jpg"
    output = tmp_path / "grace_hopper_blur.png"
    write_image(output, read_image(photo).pixels)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # PIL refuses over 200,000 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # and warns over 100,000
        assert looks_like(output, photo)
    assert Image.MAX_IMAGE_PIXELS == 100_000  # put back as it was


def test_the_python_api_refuses_pixels_paths_and_sources_of_the_wrong_kind(tmp_path, samples_dir):
    """Each was written or read without a word, or a traceback: 0..255 levels as floats were
    clipped (88% of the astronaut written pure white); a path as ``source`` an AttributeError;
    ``read_image(None)`` a pathlib TypeError; ``max_pixels=-1`` refused every photo as too large."""
    photo = read_image(samples_dir / "astronaut.jpg")
    with pytest.raises(InvalidInputError, match=r"in \[0, 1\], got values from 0 to 255.*divide by 255"):
        write_image(tmp_path / "a.png", photo.pixels * 255)
    with pytest.raises(InvalidInputError, match="source must be the LoadedImage read_image gave, got str"):
        write_image(tmp_path / "b.png", photo.pixels, source=str(samples_dir / "astronaut.jpg"))
    with pytest.raises(InvalidInputError, match=r"path must be a file name \(str or Path\), got NoneType"):
        read_image(None)
    for limit in ("x", -1, 2.5):
        with pytest.raises(InvalidInputError, match="max_pixels must be a whole number >= 1"):
            read_image(samples_dir / "astronaut.jpg", max_pixels=limit)
    assert not list(tmp_path.iterdir())
    write_image(tmp_path / "c.png", (photo.pixels * 1.002 - 0.001))  # float drift within a level: written


@pytest.mark.parametrize(
    ("fmt", "kept"), [("GIF", 10117 / 19037), ("TIFF", 12307 / 55584), ("TIFF", 0.5), ("GIF", 0.75)]
)
def test_a_cut_animation_or_page_set_fails_alone_in_one_line(tmp_path, samples_dir, fmt, kept):
    """A two-page TIFF or two-frame GIF cut short raised TypeError or IndexError from Pillow (while
    counting its frames, or decoding): the whole batch ended with a traceback, exit 1. Now such a
    file is read (its first page whole) or refused as corrupt, alone."""
    face = Image.open(samples_dir / "astronaut.jpg").resize((96, 96))
    buffer = io_module.BytesIO()
    mirrored = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    face.save(buffer, format=fmt, save_all=True, append_images=[mirrored])
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: round(len(data) * kept)])
    try:
        probe_image(path)
        image = read_image(path)
    except ImageReadError as error:
        assert "corrupt" in str(error) and str(path) in str(error)
    else:
        assert image.pixels.shape == (3, 96, 96)


def test_a_folder_inside_the_output_folder_is_read(tmp_path, samples_dir):
    """``anonymize out/photos -o out`` (or ``. -o ..`` from inside photos/) read none of its photos:
    each was "inside the output folder". Only an output folder inside the folder walked is skipped."""
    photos = tmp_path / "out" / "photos"
    photos.mkdir(parents=True)
    shutil.copy(samples_dir / "astronaut.jpg", photos / "a.jpg")
    (photos / "written").mkdir()
    shutil.copy(samples_dir / "grace_hopper.jpg", photos / "written" / "b.jpg")
    jobs, skipped = collect_images([photos], exclude=tmp_path / "out")
    assert [job.path.name for job in jobs] == ["a.jpg", "b.jpg"] and not skipped
    jobs, skipped = collect_images([photos], exclude=photos / "written")  # an output folder inside: skipped
    assert [job.path.name for job in jobs] == ["a.jpg"]
    assert [(path.name, reason.split(":")[0]) for path, reason in skipped] == [
        ("b.jpg", "inside the output folder")
    ]


def test_keep_metadata_into_a_format_without_exif_says_it_is_left_out(tmp_path, samples_dir):
    """``--keep-metadata --format bmp`` wrote the photo without its camera data, and nothing said so."""
    photo = tmp_path / "exif.jpg"
    exif = Image.Exif()
    exif[0x010F] = "TestMake"
    Image.open(samples_dir / "astronaut.jpg").save(photo, exif=exif.tobytes())
    image = read_image(photo)
    for suffix in (".bmp",):
        info: dict = {}
        write_image(tmp_path / f"out{suffix}", image.pixels, source=image, keep_metadata=True, info=info)
        assert "holds no EXIF" in info["exif_dropped"] and any("EXIF not kept" in n for n in info["notes"])
    kept: dict = {}
    write_image(tmp_path / "out.png", image.pixels, source=image, keep_metadata=True, info=kept)
    assert "exif_dropped" not in kept and Image.open(tmp_path / "out.png").getexif()[0x010F] == "TestMake"


def test_a_quality_given_for_a_lossless_output_is_said_to_be_unused(tmp_path, samples_dir):
    """``--format input --jpeg-quality 80`` on a PNG wrote a lossless PNG without a word."""
    image = read_image(samples_dir / "astronaut.jpg")
    unused: dict = {}
    write_image(tmp_path / "out.png", image.pixels, source=image, jpeg_quality=80, info=unused)
    assert unused["notes"] == ["quality 80 not used: a PNG file is stored losslessly"]
    used: dict = {}
    write_image(tmp_path / "out.jpg", image.pixels, source=image, jpeg_quality=80, info=used)
    assert not used.get("notes")


def test_heif_without_pillow_heif_is_refused_and_a_heic_photo_says_what_reads_it(
    monkeypatch, tmp_path, samples_dir
):
    """Without the heic extra, ``--format heif`` wrote JPEG files without a word, and an iPhone's
    .heic photo read "not an image, or an unsupported format"."""
    from click.testing import CliRunner

    import facecloak.io.files as files
    import facecloak.io.read as read
    from facecloak.batch_types import Options
    from facecloak.cli import main
    from facecloak.io import output_suffix

    monkeypatch.setattr(read, "HEIF_AVAILABLE", False)
    monkeypatch.setattr(files, "HEIF_AVAILABLE", False)
    with pytest.raises(ImageWriteError, match=r"pip install 'facecloak\[heic\]'"):
        output_suffix("JPEG", "heif")
    assert output_suffix("HEIF") == ".jpg"  # an input's own format, where none was asked for
    with pytest.raises(ImageWriteError, match="cannot write GIF"):  # it was a PNG, unsaid
        output_suffix("JPEG", "gif")
    photo = str(samples_dir / "astronaut.jpg")
    result = CliRunner().invoke(main, ["anonymize", photo, "-o", str(tmp_path / "o"), "--format", "heic"])
    assert result.exit_code == 2 and "heif needs pillow-heif" in result.output, result.output
    assert not (tmp_path / "o").exists()
    phone = tmp_path / "IMG_0001.HEIC"
    phone.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    with pytest.raises(ImageReadError, match="needs pillow-heif to read"):
        read_image(phone)
    for wrong in ({"jpeg_quality": 0}, {"jpeg_quality": 500}, {"max_pixels": -1}, {"chunk": 0}):
        with pytest.raises(InvalidInputError, match=next(iter(wrong))):
            Options(**wrong)
