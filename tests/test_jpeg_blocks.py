"""JPEG outputs keep every block away from the faces bit-exact (facecloak.jpeg_blocks via io.write_image)."""

from __future__ import annotations

import io as bytes_io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from facecloak.anonymize import anonymize_faces
from facecloak.cloak import create_cloak
from facecloak.io import encode_image, read_image, read_image_bytes, to_uint8, write_image
from facecloak.jpeg_blocks import BlocksUnavailable, changed_mcus, splice_jpeg
from facecloak.protection import CloakFaces

jpeglib = pytest.importorskip("jpeglib", reason="jpeglib (JPEG block editing) is not installed here")

GPS_IFD = 0x8825
REGION_SCALE = 1.3  # the anonymisers' and the cloak's default face region, relative to the box


def decoded(path) -> np.ndarray:
    """(H, W, 3) uint8 exactly as facecloak reads a photo (PIL, EXIF orientation applied)."""
    return to_uint8(read_image(path).pixels)


def face_region_blocks(boxes: torch.Tensor, path, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the 8x8-block grid cells (MCUs) a face region touches, dilated by one MCU
    when the JPEG's chroma is subsampled. Computed here from the boxes alone, not by the library."""
    jpeg = jpeglib.read_dct(str(path))
    factors = np.asarray(jpeg.samp_factor).reshape(-1, 2)
    mcu_h, mcu_w = 8 * int(factors[:, 0].max()), 8 * int(factors[:, 1].max())
    dilate = 1 if (factors != factors[0]).any() else 0
    mask = np.zeros((height, width), dtype=bool)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * REGION_SCALE
    for (cx, cy), (hx, hy) in zip(centre.tolist(), half.tolist()):
        x0, x1 = max(0, int(np.floor(cx - hx)) - 1), min(width - 1, int(np.ceil(cx + hx)) + 1)
        y0, y1 = max(0, int(np.floor(cy - hy)) - 1), min(height - 1, int(np.ceil(cy + hy)) + 1)
        col0, col1 = x0 // mcu_w - dilate, x1 // mcu_w + dilate
        row0, row1 = y0 // mcu_h - dilate, y1 // mcu_h + dilate
        mask[max(0, row0 * mcu_h) : (row1 + 1) * mcu_h, max(0, col0 * mcu_w) : (col1 + 1) * mcu_w] = True
    return mask


@pytest.fixture(scope="module")
def group(samples_dir, detector):
    image = read_image(samples_dir / "group.jpg")
    return image, detector([image.pixels])


def test_changed_mcus_marks_exactly_the_cells_with_a_change():
    before = np.zeros((40, 50, 3), np.uint8)
    after = before.copy()
    after[0, 0, 1] = 1
    after[39, 49, 2] = 9
    cells = changed_mcus(before, after, (16, 16))
    assert cells.shape == (3, 4)
    assert cells.sum() == 2 and cells[0, 0] and cells[2, 3]


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_splice_keeps_every_other_block(samples_dir, tmp_path, subsampling):
    source = tmp_path / "in.jpg"
    Image.open(samples_dir / "grace_hopper.jpg").save(source, quality=90, subsampling=subsampling)
    before = decoded(source)
    after = before.copy()
    after[200:260, 170:250] = 255 - after[200:260, 170:250]
    data, edit = splice_jpeg(source, before, after)
    out = np.asarray(Image.open(bytes_io.BytesIO(data)).convert("RGB"))
    affected = edit.affected(*before.shape[:2])
    assert 0 < edit.mcus_replaced < edit.mcus_total
    assert affected[200:260, 170:250].all()
    assert (out != before)[~affected].sum() == 0  # everything else bit-identical
    assert np.abs(out[200:260, 170:250].astype(int) - after[200:260, 170:250]).mean() < 3  # the edit is there
    if subsampling == 0:  # no chroma upsampling: not even the neighbours of a re-encoded block move
        assert (out != before)[~edit.affected(*before.shape[:2])].sum() == 0 and not edit.subsampled


def test_a_jpeg_whose_name_is_not_utf8_is_edited_block_by_block(samples_dir, tmp_path):
    """libjpeg (through jpeglib) takes a file name as UTF-8 text: a Latin-1 name from an old camera
    card (``caf\xe9.jpg``) could not be read, and the photo was re-encoded whole instead."""
    import os

    source = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.jpg"))
    source.write_bytes((samples_dir / "grace_hopper.jpg").read_bytes())
    before = decoded(source)
    after = before.copy()
    after[200:260, 170:250] = 255 - after[200:260, 170:250]
    data, edit = splice_jpeg(source, before, after)
    assert 0 < edit.mcus_replaced < edit.mcus_total


def test_anonymised_jpeg_differs_only_in_the_face_blocks(group, tmp_path, samples_dir):
    image, faces = group
    blurred = anonymize_faces(image.pixels[None], faces, "blur")[0]
    info: dict = {}
    write_image(tmp_path / "out.jpg", blurred, source=image, info=info)
    assert info["encoding"] == "jpeg-blocks" and 0 < info["mcus_reencoded"] < info["mcus_total"]
    before, after = decoded(samples_dir / "group.jpg"), decoded(tmp_path / "out.jpg")
    region = face_region_blocks(faces.boxes, samples_dir / "group.jpg", *before.shape[:2])
    differs = (before != after).any(axis=2)
    assert differs[~region].sum() == 0, "a pixel outside the face region's blocks changed"
    assert differs[region].sum() > 1000  # the faces really are blurred
    # the same with libjpeg's own decoder (jpeglib), not only PIL's
    original = jpeglib.read_spatial(str(samples_dir / "group.jpg")).spatial
    written = jpeglib.read_spatial(str(tmp_path / "out.jpg")).spatial
    assert (original != written).any(axis=2)[~region].sum() == 0


def test_upload_read_from_bytes_is_edited_block_by_block_too(group, tmp_path, samples_dir):
    """The service and the Ray batch decode from bytes: same blocks, same bytes as from the file."""
    image, faces = group
    blurred = anonymize_faces(image.pixels[None], faces, "blur")[0]
    upload = read_image_bytes((samples_dir / "group.jpg").read_bytes(), "group.jpg")
    info: dict = {}
    data = encode_image(blurred, "JPEG", source=upload, info=info)
    assert info["encoding"] == "jpeg-blocks", info.get("jpeg_fallback")
    write_image(tmp_path / "from_file.jpg", blurred, source=image)
    assert data == (tmp_path / "from_file.jpg").read_bytes()


def test_upload_never_gets_a_name_on_disk_when_edited_block_by_block(samples_dir, tmp_path, monkeypatch):
    """An upload (the unprotected photo) was written to a named temporary file to read its
    coefficients: a crash or a kill left it behind in the temporary folder."""
    original = (samples_dir / "astronaut.jpg").read_bytes()
    upload = read_image_bytes(original, "astronaut.jpg")
    pixels = upload.pixels.clone()
    pixels[:, 200:240, 200:240] = 0.5
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    written: list[bytes] = []
    real_write_bytes = Path.write_bytes

    def spy(self, data):  # every file written under the temporary folder, as it is written
        written.append(bytes(data))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", spy)
    info: dict = {}
    encode_image(pixels, "JPEG", source=upload, info=info)
    assert info["encoding"] == "jpeg-blocks", info.get("jpeg_fallback")
    assert original not in written


def test_libjpegs_files_stay_in_a_private_folder_that_a_later_run_clears(samples_dir, tmp_path, monkeypatch):
    """jpeglib hands libjpeg the whole upload (GPS, thumbnail and all) through named temporary
    files in the shared temporary folder, readable by others' umask and left there when the
    process was killed mid-call; they go to a 0700 folder of this call now, gone when it ends,
    and a folder a killed process left is removed by the next run."""
    import subprocess
    import sys
    import tempfile

    from facecloak import jpeg_blocks

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(jpeg_blocks, "_swept", set())
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    left_over = tmp_path / f"facecloak-scratch-{int(dead.stdout)}-x1"
    left_over.mkdir()
    (left_over / "tmpkilled.jpeg").write_bytes(b"the upload of a killed run")
    running = tmp_path / f"facecloak-scratch-{os.getpid() + 0}-x2"  # a live process's: kept
    running.mkdir()
    named: list[tuple[Path, int]] = []
    real_named = tempfile.NamedTemporaryFile

    def spy(*args, **kwargs):
        handle = real_named(*args, **kwargs)
        folder = Path(handle.name).parent
        named.append((folder, folder.stat().st_mode & 0o777))
        return handle

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", spy)
    upload = read_image_bytes((samples_dir / "astronaut.jpg").read_bytes(), "astronaut.jpg")
    pixels = upload.pixels.clone()
    pixels[:, 200:240, 200:240] = 0.5
    info: dict = {}
    encode_image(pixels, "JPEG", source=upload, info=info)
    assert info["encoding"] == "jpeg-blocks", info.get("jpeg_fallback")
    assert named
    for folder, mode in named:
        assert folder.parent == tmp_path and folder.name.startswith(f"facecloak-scratch-{os.getpid()}-")
        assert mode == 0o700 and not folder.exists()  # private, and gone with the call
    assert sorted(tmp_path.iterdir()) == [running]  # the killed run's folder removed, a live one kept


def test_cloaked_jpeg_differs_only_in_the_face_blocks(samples_dir, detector, dlib_resnet, tmp_path):
    image = read_image(samples_dir / "astronaut.jpg")
    faces = detector([image.pixels])
    cloak = CloakFaces(create_cloak("untargeted", [dlib_resnet], "mid", steps=3, detector=detector))
    outputs = cloak.protect([image.pixels], faces).images
    info: dict = {}
    write_image(tmp_path / "astronaut_cloaked.jpg", outputs[0], source=image, info=info)
    before, after = decoded(samples_dir / "astronaut.jpg"), decoded(tmp_path / "astronaut_cloaked.jpg")
    region = face_region_blocks(faces.boxes, samples_dir / "astronaut.jpg", *before.shape[:2])
    differs = (before != after).any(axis=2)
    assert differs[~region].sum() == 0
    assert differs[region].sum() > 0 and info["encoding"] == "jpeg-blocks"
    # re-encoding the whole photo (what --jpeg-quality 95 does) changes pixels far from the face
    write_image(tmp_path / "whole.jpg", outputs[0], source=image, jpeg_quality=95)
    assert (before != decoded(tmp_path / "whole.jpg")).any(axis=2)[~region].sum() > 10_000


def test_rotated_phone_photo_keeps_blocks_orientation_and_privacy(samples_dir, detector, tmp_path):
    stored = np.asarray(Image.open(samples_dir / "group.jpg"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright by viewers
    exif[0x010F] = "FaceCam"
    exif[GPS_IFD] = {1: "N", 2: (48.0, 51.0, 24.0)}
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(
        source, quality=92, exif=exif.tobytes(), icc_profile=icc, comment=b"private note"
    )
    image = read_image(source)
    assert image.orientation == 6 and image.size == (620, 1100)  # upright: portrait
    faces = detector([image.pixels])
    masked = anonymize_faces(image.pixels[None], faces, "mask")[0]
    for keep, make in ((False, None), (True, "FaceCam")):
        target = tmp_path / f"out{keep}.jpg"
        info: dict = {}
        write_image(target, masked, source=image, keep_metadata=keep, info=info)
        assert info["encoding"] == "jpeg-blocks"
        with Image.open(target) as written:
            tags = written.getexif()
            assert tags.get(0x0112) == 6 and tags.get(0x010F) == make and GPS_IFD not in tags
            assert written.info.get("icc_profile") == icc and "comment" not in written.info
        assert decoded(target).shape == decoded(source).shape  # still upright when read back
        # in the file's own (sideways) frame: upright (xu, yu) = (H_stored - 1 - ys, xs)
        stored_before, stored_after = np.asarray(Image.open(source)), np.asarray(Image.open(target))
        height = stored_before.shape[0]
        xu0, yu0, xu1, yu1 = faces.boxes.unbind(1)
        stored_boxes = torch.stack([yu0, height - 1 - xu1, yu1, height - 1 - xu0], dim=1)
        region = face_region_blocks(stored_boxes, source, *stored_before.shape[:2])
        differs = (stored_before != stored_after).any(axis=2)
        assert differs[~region].sum() == 0 and differs[region].sum() > 0


def test_unchanged_photo_is_written_with_identical_pixels(samples_dir, tmp_path):
    image = read_image(samples_dir / "grace_hopper.jpg")
    info: dict = {}
    write_image(tmp_path / "same.jpg", image.pixels, source=image, info=info)
    assert info["mcus_reencoded"] == 0
    assert np.array_equal(decoded(tmp_path / "same.jpg"), decoded(samples_dir / "grace_hopper.jpg"))
    with Image.open(tmp_path / "same.jpg") as written:  # the sample's comment (a source URL) is not copied
        assert "comment" not in written.info and len(written.getexif()) == 0


def test_whole_photo_reencoded_when_asked_or_when_blocks_are_impossible(samples_dir, tmp_path):
    image = read_image(samples_dir / "astronaut.jpg")
    info: dict = {}
    write_image(tmp_path / "q.jpg", image.pixels, source=image, jpeg_quality=90, info=info)
    assert info == {"encoding": "jpeg"}
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(samples_dir / "astronaut.jpg").convert("CMYK").save(cmyk, quality=90)
    source = read_image(cmyk)
    info = {}
    write_image(tmp_path / "from_cmyk.jpg", source.pixels, source=source, info=info)
    assert info["encoding"] == "jpeg" and "CMYK" in info["jpeg_fallback"]
    png = tmp_path / "in.png"
    Image.open(samples_dir / "astronaut.jpg").save(png)
    with pytest.raises(BlocksUnavailable):
        splice_jpeg(png, decoded(png), decoded(png))


def test_png_stays_lossless_outside_the_faces(group, tmp_path):
    image, faces = group
    png = tmp_path / "group.png"
    Image.fromarray(to_uint8(image.pixels)).save(png)
    source = read_image(png)
    pixelated = anonymize_faces(source.pixels[None], faces, "pixelate")[0]
    write_image(tmp_path / "out.png", pixelated, source=source)
    before, after = decoded(png), decoded(tmp_path / "out.png")
    differs = (before != after).any(axis=2)
    inside = np.zeros_like(differs)
    for x0, y0, x1, y1 in (faces.boxes * 1.0).tolist():
        cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * 0.65 + 1, (y1 - y0) * 0.65 + 1
        inside[max(0, int(cy - hy)) : int(cy + hy) + 1, max(0, int(cx - hx)) : int(cx + hx) + 1] = True
    assert differs[~inside].sum() == 0 and differs[inside].sum() > 0


def test_jpeglib_is_entered_by_one_thread_at_a_time(samples_dir, monkeypatch):
    """jpeglib is not thread-safe: the service's HTTP threads editing JPEGs at once killed the
    server (a bus error, or ``malloc(): unaligned tcache chunk detected``, 2 of 9 runs of 400
    requests from 8 clients). Every call into it now holds `jpeg_blocks._LIBJPEG`."""
    import jpeglib

    from facecloak import jpeg_blocks

    calls = []

    def held(function):
        def call(*args, **kwargs):
            calls.append(jpeg_blocks._LIBJPEG.locked())
            return function(*args, **kwargs)

        return call

    for name in ("read_dct", "from_spatial"):
        monkeypatch.setattr(jpeglib, name, held(getattr(jpeglib, name)))
    source = samples_dir / "grace_hopper.jpg"
    before = decoded(source)
    after = before.copy()
    after[100:140, 100:140] = 128
    splice_jpeg(source, before, after)
    splice_jpeg(source.read_bytes(), before, after)
    assert len(calls) >= 4 and all(calls)
