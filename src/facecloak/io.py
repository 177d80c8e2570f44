"""Reading and writing photos: the only module that touches files, PIL, uint8 and EXIF.

Everything past this module sees a (3, H, W) float32 RGB tensor in [0, 1]. Reading applies the
EXIF orientation, converts CMYK, palette, grey, 16-bit and alpha images, and turns every kind of
bad file (missing, empty, truncated, not an image, too many pixels) into an `ImageReadError`
whose message is one line naming the file. Writing is atomic (temporary file in the target
folder, then `os.replace`), never replaces an input, and drops EXIF (GPS above all) unless asked.
A JPEG written from a JPEG keeps every 8x8 block the protection did not touch bit for bit
(`facecloak.jpeg_blocks`); other formats are written losslessly where they were lossless.
"""

from __future__ import annotations

import io as _bytes_io
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from torch import Tensor

from facecloak import jpeg_blocks
from facecloak.errors import ImageReadError, ImageWriteError

try:  # HEIC/HEIF support is an optional extra (pip install facecloak[heic]).
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the extra
    HEIF_AVAILABLE = False

MAX_IMAGE_PIXELS = 120_000_000
"""Default decompression-bomb guard: images with more pixels are refused (a 200 MP phone photo
needs ``max_pixels`` raised explicitly). Override per call or with FACECLOAK_MAX_PIXELS."""

IMAGE_SUFFIXES = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".heic": "HEIF",
    ".heif": "HEIF",
}
"""File suffixes picked up when walking folders, with the format each one names."""

OUTPUT_FORMATS = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "TIFF": ".tif",
    "BMP": ".bmp",
    "HEIF": ".heic",
}
"""Formats facecloak writes, with their suffix. GIF inputs are written as PNG: a palette would
quantise a cloak away."""

JPEG_QUALITY = 95
"""Quality of JPEG/WebP/HEIF outputs that are encoded from pixels (a JPEG written from a JPEG
keeps the input's own quantisation instead, see `write_image`)."""
_GPS_IFD_TAG = 0x8825
_ORIENTATION_TAG = 0x0112


@dataclass
class LoadedImage:
    """A decoded photo and what is needed to write it back faithfully.

    Attributes:
        path: the file it came from.
        pixels: (3, H, W) float32 RGB in [0, 1], EXIF orientation applied.
        alpha: (1, H, W) float32 in [0, 1] for images with transparency, else None.
        format: PIL format name of the source ("JPEG", "PNG", ...).
        grayscale: the source had no colour (written back as grey unless colour was added).
        icc_profile: the source's ICC profile, kept on output (None after a CMYK conversion).
        exif: the source's EXIF block (orientation already applied), used only when asked.
        orientation: the source's EXIF orientation (1-8), already applied to ``pixels``; a JPEG
            edited block by block is stored in the source's orientation and keeps this tag.
        encoded: a JPEG's own bytes when it was decoded from memory (`read_image_bytes`), so
            that it can be edited block by block without a file on disk; None otherwise.
    """

    path: Path
    pixels: Tensor
    alpha: Tensor | None = None
    format: str = "PNG"
    grayscale: bool = False
    icc_profile: bytes | None = None
    exif: bytes | None = field(default=None, repr=False)
    orientation: int = 1
    encoded: bytes | None = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.pixels.shape[2]), int(self.pixels.shape[1])


def max_pixels_default() -> int:
    """The pixel limit in force: FACECLOAK_MAX_PIXELS if set, else `MAX_IMAGE_PIXELS`."""
    value = os.environ.get("FACECLOAK_MAX_PIXELS")
    return int(value) if value else MAX_IMAGE_PIXELS


class _PilPixelLimit:
    """PIL's process-wide decompression-bomb guard, raised only while facecloak reads a photo.

    PIL refuses to open an image over ``2 * Image.MAX_IMAGE_PIXELS`` before our own, explicit
    limit is checked; a user who raises ``max_pixels`` must not be stopped by it. So each read
    raises PIL's guard to its own limit for the duration of the read, and the last read to finish
    puts back whatever was there before: nothing stays changed after facecloak returns. (A
    truncated file is an error because PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False by
    default; facecloak does not set it.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limits: list[int] = []  # the limits of the reads in progress
        self._saved: int | None = None

    @contextmanager
    def at_least(self, limit: int) -> Iterator[None]:
        """Within the block PIL's guard is at least ``limit`` (unless the process switched it off)."""
        with self._lock:
            if not self._limits:
                self._saved = Image.MAX_IMAGE_PIXELS
            self._limits.append(limit)
            self._apply()
        try:
            yield
        finally:
            with self._lock:
                self._limits.remove(limit)
                if self._limits:
                    self._apply()
                else:
                    Image.MAX_IMAGE_PIXELS = self._saved

    def _apply(self) -> None:
        if self._saved is not None:
            Image.MAX_IMAGE_PIXELS = max(self._saved, *self._limits)


_PIL_PIXEL_LIMIT = _PilPixelLimit()


def read_image(path: str | Path, *, max_pixels: int | None = None) -> LoadedImage:
    """Decode one photo into a (3, H, W) float tensor in [0, 1].

    Args:
        path: the file to read.
        max_pixels: refuse images with more pixels than this (decompression-bomb guard);
            default `max_pixels_default()`.

    Raises:
        ImageReadError: one line naming the file and the reason.

    Example:
        >>> image = read_image("samples/astronaut.jpg")  # doctest: +SKIP
        >>> image.pixels.shape
        torch.Size([3, 512, 512])
    """
    path = Path(path)
    limit = max_pixels or max_pixels_default()
    with _PIL_PIXEL_LIMIT.at_least(limit):  # PIL's own guard must not be stricter than ours
        return _read_image(path, limit)


def _read_image(path: Path, limit: int) -> LoadedImage:
    if not path.exists():
        raise ImageReadError("no such file or folder", path)
    if not path.is_file():
        raise ImageReadError("not a regular file", path)
    if path.stat().st_size == 0:
        raise ImageReadError("empty file (0 bytes)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > limit:
                    raise ImageReadError(
                        f"{width}x{height} = {width * height:,} pixels, more than the limit of {limit:,} "
                        "(decompression-bomb guard; raise it with --max-pixels)",
                        path,
                    )
                opened.seek(0)  # first frame of a GIF or multi-page TIFF
                source_format = opened.format or "PNG"
                exif = opened.info.get("exif")
                icc = opened.info.get("icc_profile")
                orientation = _orientation(opened)
                image = ImageOps.exif_transpose(opened)
                image.load()
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError(
            f"more pixels than the limit of {limit:,} (decompression-bomb guard; raise it with --max-pixels)",
            path,
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image, or an unsupported format", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(f"truncated or corrupt image data ({_short(error)})", path) from None
    except MemoryError:
        raise ImageReadError("image too large to decode in memory", path) from None
    pixels, alpha, grayscale, icc = _to_rgb_tensor(image, icc)
    return LoadedImage(path, pixels, alpha, source_format, grayscale, icc, exif, orientation)


def probe_image(path: str | Path, *, max_pixels: int | None = None) -> str:
    """The format of the photo at ``path`` ("JPEG", "PNG", ...), from its header alone.

    Cheap (nothing is decoded): a batch calls it for every input before any work, so that a
    missing, empty, unidentifiable or oversized file fails at once and every output name is
    known up front. A file that passes can still fail at `read_image` (truncated data).

    Raises:
        ImageReadError: one line naming the file and the reason.
    """
    path = Path(path)
    limit = max_pixels or max_pixels_default()
    with _PIL_PIXEL_LIMIT.at_least(limit):
        return _probe_image(path, limit)


def _probe_image(path: Path, limit: int) -> str:
    if not path.exists():
        raise ImageReadError("no such file or folder", path)
    if not path.is_file():
        raise ImageReadError("not a regular file", path)
    if path.stat().st_size == 0:
        raise ImageReadError("empty file (0 bytes)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                source_format = opened.format or "PNG"
    except Image.DecompressionBombError:
        raise ImageReadError(
            f"more pixels than the limit of {limit:,} (decompression-bomb guard; raise it with --max-pixels)",
            path,
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image, or an unsupported format", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(f"truncated or corrupt image data ({_short(error)})", path) from None
    if width * height > limit:
        raise ImageReadError(
            f"{width}x{height} = {width * height:,} pixels, more than the limit of {limit:,} "
            "(decompression-bomb guard; raise it with --max-pixels)",
            path,
        )
    return source_format


def _orientation(opened: Image.Image) -> int:
    try:
        value = int(opened.getexif().get(_ORIENTATION_TAG, 1))
    except (TypeError, ValueError, SyntaxError, OSError):
        return 1
    return value if 1 <= value <= 8 else 1


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:120] or type(error).__name__


def _to_rgb_tensor(image: Image.Image, icc: bytes | None) -> tuple[Tensor, Tensor | None, bool, bytes | None]:
    """Convert any PIL mode to float RGB in [0, 1] plus an optional alpha plane."""
    mode = image.mode
    alpha: np.ndarray | None = None
    grayscale = mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La")
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode == "CMYK":
        image = _cmyk_to_srgb(image, icc)
        icc = None  # the source profile described CMYK; the pixels are sRGB now
        mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        grey = np.asarray(image, dtype=np.float32)
        scale = 65535.0 if mode != "F" or grey.max() > 1.0 else 1.0
        rgb = np.repeat((grey / scale).clip(0, 1)[..., None], 3, axis=2)
    else:
        if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
            alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    alpha_tensor = None if alpha is None else torch.from_numpy(alpha)[None]
    return pixels, alpha_tensor, grayscale, icc


def _cmyk_to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """Colour-managed CMYK -> sRGB when the file carries a profile, PIL's plain formula otherwise."""
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(_bytes_io.BytesIO(icc))
            target = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(image, source, target, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass
    return image.convert("RGB")


def output_suffix(source_format: str, requested: str | None = None) -> str:
    """The file suffix for an output: the requested format, else the source's (GIF -> PNG)."""
    name = (requested or source_format).upper()
    name = {"JPG": "JPEG", "TIF": "TIFF", "HEIC": "HEIF", "GIF": "PNG", "MPO": "JPEG"}.get(name, name)
    if name == "HEIF" and not HEIF_AVAILABLE:
        name = "JPEG"
    if name not in OUTPUT_FORMATS:
        raise ImageWriteError(f"unsupported output format {requested or source_format!r}")
    return OUTPUT_FORMATS[name]


def write_image(
    path: str | Path,
    pixels: Tensor,
    *,
    source: LoadedImage | None = None,
    keep_metadata: bool = False,
    protected: Iterable[Path] = (),
    overwrite: bool = False,
    jpeg_quality: int | None = None,
    info: dict | None = None,
) -> Path:
    """Write a (3, H, W) [0, 1] tensor atomically, in the format the suffix of ``path`` names.

    A JPEG written from a JPEG ``source`` with ``jpeg_quality`` None is edited in the JPEG's own
    domain: only the 8x8 blocks (MCUs) holding a changed pixel are re-encoded, with the source's
    own quantisation tables, and every other block keeps the source's exact coefficients, so it
    decodes to exactly the same pixels (see `facecloak.jpeg_blocks`). Where that is not possible
    (a kind of JPEG libjpeg cannot edit, no jpeglib) the whole photo is encoded at
    `JPEG_QUALITY`, and ``info["jpeg_fallback"]`` says why.

    Args:
        path: destination; its suffix picks the format.
        pixels: (3, H, W) float RGB in [0, 1].
        source: the image it was made from: its alpha plane, ICC profile and greyness carry over.
        keep_metadata: keep the source's EXIF minus GPS (default: drop all EXIF).
        protected: files that must never be replaced (the batch's inputs).
        overwrite: replace an existing output file (never a protected one).
        jpeg_quality: quality for JPEG/WebP/HEIF outputs encoded from pixels; None keeps a JPEG
            source's own quantisation (block by block) and uses `JPEG_QUALITY` otherwise. Giving
            a number re-encodes the whole photo at it.
        info: if given, filled with how the file was written (``encoding``: "jpeg-blocks" with
            the re-encoded MCU counts, or the format name; ``jpeg_fallback``: why not blocks).

    Raises:
        ImageWriteError: one line naming the file and the reason; nothing is left behind.
    """
    path = Path(path)
    _check_target(path, protected, overwrite)
    if path.suffix.lower() not in IMAGE_SUFFIXES or IMAGE_SUFFIXES[path.suffix.lower()] == "GIF":
        raise ImageWriteError(f"cannot write format {path.suffix.lower() or '(none)'}", path)
    try:
        data = encode_image(
            pixels,
            IMAGE_SUFFIXES[path.suffix.lower()],
            source=source,
            keep_metadata=keep_metadata,
            jpeg_quality=jpeg_quality,
            info=info,
        )
    except ImageWriteError as error:
        raise ImageWriteError(error.reason, path) from None
    return write_bytes_atomic(path, data, protected=protected, overwrite=overwrite)


_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
"""The inverse of each EXIF orientation's transform (as `ImageOps.exif_transpose` applies it)."""


def _jpeg_keeping_blocks(pixels: Tensor, source: LoadedImage, keep_metadata: bool, info: dict) -> bytes:
    """The output JPEG's bytes, edited block by block from the source file (see `write_image`)."""
    if source.format not in ("JPEG", "MPO"):
        raise jpeg_blocks.BlocksUnavailable(f"the input is {source.format}, not JPEG")
    original = source.encoded if source.encoded is not None else source.path
    if source.alpha is not None or (source.encoded is None and not source.path.is_file()):
        raise jpeg_blocks.BlocksUnavailable("the input's own JPEG bytes are not at hand")
    before, after = to_uint8(source.pixels), to_uint8(pixels)
    if before.shape != after.shape:
        raise jpeg_blocks.BlocksUnavailable("the output's size differs from the input's")
    undo = _UNDO_ORIENTATION.get(source.orientation)
    if undo is not None:  # edit the file in its stored orientation; the EXIF tag keeps it upright
        before = np.asarray(Image.fromarray(before).transpose(undo))
        after = np.asarray(Image.fromarray(after).transpose(undo))
    data, edit = jpeg_blocks.splice_jpeg(original, before, after)
    info.update(encoding="jpeg-blocks", **edit.summary())
    return _with_metadata(data, _jpeg_exif(source, keep_metadata), source.icc_profile)


def _jpeg_exif(source: LoadedImage, keep_metadata: bool) -> bytes | None:
    """EXIF for a block-edited JPEG: as `strip_location` when kept, but with the stored orientation."""
    if keep_metadata and source.exif:
        exif = Image.Exif()
        exif.load(source.exif)
        exif.pop(_GPS_IFD_TAG, None)
    elif source.orientation != 1:
        exif = Image.Exif()  # nothing but the orientation, so that viewers turn the photo upright
    else:
        return None
    if source.orientation != 1:
        exif[_ORIENTATION_TAG] = source.orientation
    else:
        exif.pop(_ORIENTATION_TAG, None)
    return exif.tobytes()


_ICC_CHUNK_BYTES = 65_519


def _with_metadata(data: bytes, exif: bytes | None, icc: bytes | None) -> bytes:
    """Insert an EXIF (APP1) and ICC profile (APP2 chunks) segment after a JPEG's JFIF header."""
    segments = []
    if exif:
        payload = exif if exif.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif
        if len(payload) + 2 > 0xFFFF:
            raise jpeg_blocks.BlocksUnavailable("EXIF block too large for one segment")
        segments.append(b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload)
    if icc:
        chunks = [icc[i : i + _ICC_CHUNK_BYTES] for i in range(0, len(icc), _ICC_CHUNK_BYTES)]
        if len(chunks) > 255:
            raise jpeg_blocks.BlocksUnavailable("ICC profile too large")
        for number, chunk in enumerate(chunks, start=1):
            payload = b"ICC_PROFILE\x00" + bytes([number, len(chunks)]) + chunk
            segments.append(b"\xff\xe2" + (len(payload) + 2).to_bytes(2, "big") + payload)
    position = 2  # after SOI; then past the JFIF APP0 libjpeg wrote
    if data[2:4] == b"\xff\xe0":
        position = 4 + int.from_bytes(data[4:6], "big")
    return data[:position] + b"".join(segments) + data[position:]


def _check_target(path: Path, protected: Iterable[Path], overwrite: bool) -> None:
    """Refuse an input's own file always, and an existing output unless ``overwrite``."""
    if any(same_file(path, other) for other in protected):
        raise ImageWriteError("refusing to overwrite an input file", path)
    if path.exists() and not overwrite:
        raise ImageWriteError("output exists (use --overwrite to replace earlier outputs)", path)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (hard links and symlinks included)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def to_uint8(pixels: Tensor) -> np.ndarray:
    """(3, H, W) [0, 1] float tensor -> (H, W, 3) uint8 array, rounding to nearest."""
    array = (pixels.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy())


def _to_pil(pixels: Tensor, source: LoadedImage | None, format_name: str) -> Image.Image:
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ImageWriteError(f"expected a (3, H, W) tensor, got {tuple(pixels.shape)}")
    rgb = to_uint8(pixels)
    grey = source is not None and source.grayscale and bool((rgb.max(2) == rgb.min(2)).all())
    image = Image.fromarray(rgb[..., 0] if grey else rgb, "L" if grey else "RGB")
    alpha = source.alpha if source is not None else None
    if alpha is not None and format_name in ("PNG", "WEBP", "TIFF"):
        plane = (alpha[0].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        image.putalpha(Image.fromarray(plane, "L"))
    return image


def _save_options(format_name: str, source: LoadedImage | None, keep_metadata: bool, quality: int) -> dict:
    options: dict = {}
    if source is not None and source.icc_profile:
        options["icc_profile"] = source.icc_profile
    if keep_metadata and source is not None and source.exif:
        options["exif"] = strip_location(source.exif)
    if format_name == "JPEG":
        options.update(quality=quality, subsampling=0, optimize=True)
    elif format_name == "WEBP":
        options.update(quality=quality, method=4)
    elif format_name == "HEIF":
        options.update(quality=quality)
    elif format_name == "TIFF":
        options.update(compression="tiff_deflate")
    elif format_name == "PNG":
        options.update(compress_level=6)
    return options


def strip_location(exif_bytes: bytes) -> bytes:
    """EXIF without the GPS block, with orientation reset (the pixels are already upright)."""
    exif = Image.Exif()
    exif.load(exif_bytes)
    exif.pop(_GPS_IFD_TAG, None)
    if _ORIENTATION_TAG in exif:
        exif[_ORIENTATION_TAG] = 1
    return exif.tobytes()


@dataclass(frozen=True)
class ImageJob:
    """One input photo and where its output goes, relative to the output folder."""

    path: Path
    relative: Path  # mirrors the input tree under the output folder


def collect_images(
    paths: Sequence[str | Path], *, exclude: Path | None = None
) -> tuple[list[ImageJob], list[tuple[Path, str]]]:
    """Expand files and folders (recursively, sorted) into image jobs.

    Files named explicitly are always tried (a bad one fails with a reason later); inside folders
    only files with an image suffix are taken and the rest are returned as skipped, with a note.
    ``exclude`` (the output folder) is never walked when it lies inside a folder given, so
    outputs are not re-read as inputs (a batch also passes over files that are the outputs of
    other inputs, see `facecloak.batch.plan_batch`).
    """
    jobs: list[ImageJob] = []
    skipped: list[tuple[Path, str]] = []
    excluded = exclude.resolve() if exclude is not None and exclude.exists() else None
    for given in map(Path, paths):
        if given.is_dir():
            skip = excluded if excluded is not None and excluded != given.resolve() else None
            for file in sorted(p for p in given.rglob("*") if p.is_file()):
                relative = file.relative_to(given)
                if skip is not None and skip in file.resolve().parents:
                    continue
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    jobs.append(ImageJob(file, Path(given.name) / relative if len(paths) > 1 else relative))
                else:
                    skipped.append((file, "not an image suffix"))
        else:
            jobs.append(ImageJob(given, Path(given.name)))
    return jobs, skipped


def output_path(
    job: ImageJob, out_dir: Path | None, tag: str, format_name: str | None, source_format: str
) -> Path:
    """Where the output of ``job`` goes: ``<stem>_<tag><suffix>``, mirrored under ``out_dir``.

    Without ``out_dir`` the output sits beside the input. The tag guarantees that an output never
    has an input's name, even when both live in the same folder.
    """
    suffix = output_suffix(source_format, format_name)
    name = f"{job.path.stem}_{tag}{suffix}"
    if out_dir is None:
        return job.path.with_name(name)
    return out_dir / job.relative.with_name(name)


def jpeg_roundtrip(pixels: Tensor, quality: int = 75) -> Tensor:
    """Encode a (3, H, W) [0, 1] image as a real JPEG in memory (PIL, 4:2:0) and decode it again.

    This is what an upload site does to a photo; the cloak is checked against it.
    """
    buffer = _bytes_io.BytesIO()
    Image.fromarray(to_uint8(pixels)).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        array = np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).to(pixels.device)


# -- in-memory photos (the service and the distributed batch) ---------------------------------------


def probe_image_bytes(data: bytes) -> tuple[str, int, int]:
    """Format and size of an in-memory photo from its header alone, without decoding pixels.

    The format is sniffed from the content (PIL's signatures), never taken from a file name or a
    declared content type. A 30,000 x 30,000 PNG costs a few bytes to probe.

    Returns:
        (PIL format name, width, height), the size before EXIF rotation.

    Raises:
        ImageReadError: the bytes are not an image of a format facecloak reads.
    """
    if not data:
        raise ImageReadError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings(), _PIL_PIXEL_LIMIT.at_least(max_pixels_default()):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(_bytes_io.BytesIO(data)) as opened:  # lazy: reads the header only
                return opened.format or "", int(opened.size[0]), int(opened.size[1])
    except Image.DecompressionBombError as error:  # PIL refuses over twice its own limit at open
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
        raise ImageReadError(f"{size}, more than the decompression-bomb limit") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise ImageReadError("not an image, or an unsupported format") from None


def read_image_bytes(data: bytes, name: str = "upload", *, max_pixels: int | None = None) -> LoadedImage:
    """Decode an in-memory photo with exactly `read_image`'s checks and conversions.

    The bytes are handed to `read_image` through an anonymous in-memory file (``memfd`` on Linux,
    an unlinked temporary file elsewhere), so an upload never gets a name on disk and nothing is
    left behind, even after a crash. Errors name ``name`` instead of that file.

    Example:
        >>> image = read_image_bytes(Path("samples/astronaut.jpg").read_bytes(), "astronaut.jpg")
        >>> image.size
        (512, 512)
    """
    if hasattr(os, "memfd_create"):
        handle = os.memfd_create("facecloak-upload", getattr(os, "MFD_CLOEXEC", 0))
        stream = os.fdopen(handle, "w+b")
    else:  # pragma: no cover - macOS, Windows
        stream = tempfile.TemporaryFile(prefix=".facecloak-")
    with stream:
        stream.write(data)
        stream.flush()
        fd_folder = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
        try:
            image = read_image(f"{fd_folder}/{stream.fileno()}", max_pixels=max_pixels)
        except ImageReadError as error:
            raise ImageReadError(error.reason, name) from None
    image.path = Path(name)
    if image.format in ("JPEG", "MPO"):
        image.encoded = data
    return image


def encode_image(
    pixels: Tensor,
    format_name: str,
    *,
    source: LoadedImage | None = None,
    keep_metadata: bool = False,
    jpeg_quality: int | None = None,
    info: dict | None = None,
) -> bytes:
    """Encode a (3, H, W) [0, 1] tensor into the bytes `write_image` writes (see its Args).

    Same conversion, colour profile, alpha, EXIF policy (dropped unless ``keep_metadata``, GPS
    always dropped) and encoder settings. A JPEG made from a JPEG ``source`` with
    ``jpeg_quality`` None is edited block by block in the source's own coefficients, whether the
    source was read from a file or from bytes (`read_image_bytes`).
    """
    format_name = format_name.upper()
    info = {} if info is None else info
    if format_name not in OUTPUT_FORMATS:
        raise ImageWriteError(f"cannot write format {format_name!r}")
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ImageWriteError(f"expected a (3, H, W) tensor, got {tuple(pixels.shape)}")
    if format_name == "JPEG" and jpeg_quality is None and source is not None:
        try:
            return _jpeg_keeping_blocks(pixels, source, keep_metadata, info)
        except jpeg_blocks.BlocksUnavailable as why:
            info["jpeg_fallback"] = f"whole photo re-encoded at quality {JPEG_QUALITY}: {why}"
    quality = JPEG_QUALITY if jpeg_quality is None else jpeg_quality
    image = _to_pil(pixels, source, format_name)
    buffer = _bytes_io.BytesIO()
    try:
        image.save(buffer, format=format_name, **_save_options(format_name, source, keep_metadata, quality))
    except (OSError, ValueError, KeyError) as error:
        raise ImageWriteError(f"could not encode ({_short(error)})") from None
    info["encoding"] = format_name.lower()
    return buffer.getvalue()


def write_bytes_atomic(
    path: str | Path, data: bytes, *, protected: Iterable[Path] = (), overwrite: bool = False
) -> Path:
    """Write already encoded bytes to ``path`` atomically (temporary file, fsync, rename).

    The same guarantees as `write_image`: a final name never holds a partial file, an input is
    never replaced, an existing file only with ``overwrite``.
    """
    path = Path(path)
    _check_target(path, protected, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".facecloak-", suffix=path.suffix, dir=path.parent)
    except OSError as error:
        raise ImageWriteError(f"could not write ({_short(error)})", path) from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise ImageWriteError(f"could not write ({_short(error)})", path) from None
    return path
