"""Writing photos: encoding tensors (metadata, ICC, JPEG blocks kept) and atomic file writes."""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps
from torch import Tensor

from facecloak import jpeg_blocks
from facecloak.defaults import OUTPUT_JPEG_QUALITY
from facecloak.errors import ImageWriteError, InvalidInputError
from facecloak.io.files import IMAGE_SUFFIXES, OUTPUT_FORMATS, ProtectedFiles, same_file
from facecloak.io.read import _ORIENTATION_TAG, LoadedImage, _short, rgb_pixels
from facecloak.transforms import levels_8bit

JPEG_QUALITY = OUTPUT_JPEG_QUALITY
"""Quality of outputs encoded from pixels (`facecloak.defaults.OUTPUT_JPEG_QUALITY`)."""
_GPS_IFD_TAG = 0x8825
_EXIF_IFD_TAG = 0x8769

_PIXEL_TAGS = {
    0x0201: "JPEGInterchangeFormat (a thumbnail's offset)",
    0x0202: "JPEGInterchangeFormatLength",
    0x0111: "StripOffsets (image data)",
    0x0117: "StripByteCounts",
    0x0144: "TileOffsets",
    0x0145: "TileByteCounts",
    0x014A: "SubIFDs (previews of raw files)",
    0x02BC: "XMP (may hold base64 thumbnails)",
    0x83BB: "IPTC",
    0x8649: "Photoshop resources (hold a thumbnail)",
    0x927C: "MakerNote (misplaced in the main directory: may hold previews)",
    0xC634: "DNGPrivateData (Adobe's copy of the maker note, previews included)",
}
"""EXIF tags of the main directory that hold or point to pixels of the original photo: a
thumbnail or preview of the unprotected face. Never kept, whatever ``keep_metadata`` says."""

_MAKER_NOTE_TAG = 0x927C
"""The camera maker's private block (in the Exif directory): Canon, Nikon, Olympus, Pentax and
Sony cameras store preview JPEGs of the whole photo in it. Never kept."""


def write_image(
    path: str | Path,
    pixels: Tensor,
    *,
    source: LoadedImage | None = None,
    keep_metadata: bool = False,
    protected: Iterable[Path] | ProtectedFiles = (),
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
        source: the image it was made from: its alpha plane, ICC profile and greyness carry over;
            its file is never replaced, like those in ``protected``.
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
    _check_source(source)
    if source is not None and same_file(path, source.path):  # the photo it was made from is an input
        raise ImageWriteError("refusing to overwrite an input file (the source photo)", path)
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
    return _with_metadata(data, _jpeg_exif(source, keep_metadata, info), source.icc_profile)


def _jpeg_exif(source: LoadedImage, keep_metadata: bool, info: dict) -> bytes | None:
    """EXIF for a block-edited JPEG: as `strip_location` when kept, but with the stored orientation.

    Kept EXIF too large for the JPEG is left out (``info`` says so); the orientation stays.
    """
    if keep_metadata and source.exif:
        try:
            exif = _exif_to_keep(source.exif)
            if source.orientation != 1:
                exif[_ORIENTATION_TAG] = source.orientation
            else:
                exif.pop(_ORIENTATION_TAG, None)
            kept = exif.tobytes()
        except _DAMAGED_EXIF as error:
            _exif_not_kept(info, error)
            kept = b""
        if kept and _exif_fits_jpeg(kept, info):
            return kept
    if source.orientation == 1:
        return None
    exif = Image.Exif()  # nothing but the orientation, so that viewers turn the photo upright
    exif[_ORIENTATION_TAG] = source.orientation
    return exif.tobytes()


NO_EXIF_FORMATS = ("BMP",)
"""Formats whose files hold no EXIF: --keep-metadata's camera data is said to be left out."""

JPEG_MAX_SIDE = 65_500
"""libjpeg's largest width or height."""
_JPEG_EXIF_BYTES = 65_533
"""The most EXIF a JPEG holds: one APP1 segment (its 2-byte length counts itself)."""


def _exif_fits_jpeg(exif: bytes, info: dict) -> bool:
    """Whether a JPEG can hold ``exif``; if not, ``info`` says that the output is written without it.

    A PNG, WebP, TIFF or HEIC can carry far more EXIF than a JPEG's one 64 KB segment; such a
    photo written as JPEG with --keep-metadata failed outright ("EXIF data is too long"), leaving
    the user with no protected photo at all for the sake of its metadata.
    """
    size = len(exif) if exif.startswith(b"Exif\x00\x00") else len(exif) + 6
    if size <= _JPEG_EXIF_BYTES:
        return True
    info["exif_dropped"] = f"{size:,} bytes, more than a JPEG's {_JPEG_EXIF_BYTES:,}"
    _note(info, f"EXIF not kept: {info['exif_dropped']}")
    return False


def _note(info: dict, text: str) -> None:
    """Add a plain sentence to ``info["notes"]``: what the output lacks that its input had."""
    notes = info.setdefault("notes", [])
    if text not in notes:
        notes.append(text)


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


def _check_target(path: Path, protected: Iterable[Path] | ProtectedFiles, overwrite: bool) -> None:
    """Refuse an input's own file always, and an existing output unless ``overwrite``.

    ``protected``: paths, or a `ProtectedFiles` built once for a whole batch (one ``stat`` here).
    """
    if not isinstance(protected, ProtectedFiles):
        protected = ProtectedFiles(protected)
    if path in protected:
        raise ImageWriteError("refusing to overwrite an input file", path)
    if path.exists() and not overwrite:
        raise ImageWriteError("output exists (use --overwrite to replace earlier outputs)", path)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_uint8(pixels: Tensor) -> np.ndarray:
    """(3, H, W) [0, 1] float tensor -> (H, W, 3) uint8 array, rounding to nearest."""
    array = levels_8bit(pixels).to(torch.uint8)
    return np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy())


def _to_pil(pixels: Tensor, source: LoadedImage | None, format_name: str) -> Image.Image:
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ImageWriteError(f"expected a (3, H, W) tensor, got {tuple(pixels.shape)}")
    rgb = to_uint8(pixels)
    grey = source is not None and source.grayscale and bool((rgb.max(2) == rgb.min(2)).all())
    image = Image.fromarray(rgb[..., 0] if grey else rgb, "L" if grey else "RGB")
    alpha = source.alpha if source is not None else None
    if alpha is not None and format_name in ALPHA_FORMATS:
        plane = (alpha[0].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        image.putalpha(Image.fromarray(plane, "L"))
    return image


def _save_options(
    format_name: str,
    source: LoadedImage | None,
    keep_metadata: bool,
    quality: int,
    mode: str = "RGB",
    info: dict | None = None,
    chosen_quality: bool = False,
) -> dict:
    options: dict = {}
    if source is not None and source.icc_profile and _profile_fits(source.icc_profile, mode):
        options["icc_profile"] = source.icc_profile
    if keep_metadata and source is not None and source.exif:
        info = {} if info is None else info
        exif = strip_location(source.exif, info)
        if exif and format_name in NO_EXIF_FORMATS:  # Pillow drops it there without a word
            info["exif_dropped"] = f"a {format_name} file holds no EXIF"
            _note(info, f"EXIF not kept: {info['exif_dropped']}")
        elif exif and (format_name != "JPEG" or _exif_fits_jpeg(exif, info)):
            options["exif"] = exif
    if format_name == "JPEG":
        options.update(quality=quality, subsampling=0, optimize=True)
    elif format_name == "WEBP" and source is not None and source.lossless and not chosen_quality:
        options.update(lossless=True, quality=100, method=4)  # kept lossless, as it came
    elif format_name == "WEBP":
        options.update(quality=quality, method=4)
    elif format_name == "HEIF":
        options.update(quality=quality)
    elif format_name == "TIFF":
        # libtiff (which Pillow's deflate needs) cannot write the EXIF's own directories (Exif,
        # Interop): with EXIF kept it raised "Error setting from dictionary" and wrote nothing.
        # Pillow's own writer, uncompressed, writes them.
        options.update(compression=None if "exif" in options else "tiff_deflate")
    elif format_name == "PNG":
        options.update(compress_level=6)
    return options


_PROFILE_SPACES = {"L": "GRAY", "LA": "GRAY", "RGB": "RGB", "RGBA": "RGB"}
"""The ICC colour space (``xcolor_space``, stripped) each written PIL mode needs."""


def _profile_fits(icc: bytes, mode: str) -> bool:
    """Whether an ICC profile describes pixels of PIL ``mode``: a grey profile does not fit RGB.

    A grey photo's own profile kept on an output with colour added (a cloak or a coloured cover)
    made a file that colour-managed software rejects ("cannot build transform") or shows wrongly;
    such an output is written without it (sRGB, as untagged pixels are read).
    """
    try:
        space = ImageCms.ImageCmsProfile(BytesIO(icc)).profile.xcolor_space.strip()
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return True  # unreadable here: kept as before, the decision is the reader's
    return space == _PROFILE_SPACES.get(mode, space)


def _exif_to_keep(exif_bytes: bytes) -> Image.Exif:
    """The source's EXIF less what betrays the person: its GPS block and its copies of the photo.

    Thumbnails, previews and the maker note would carry the unprotected face inside the
    protected file. The thumbnail's own directory (IFD1) is never written back by Pillow.
    Raises one of `_DAMAGED_EXIF` on EXIF Pillow cannot parse or write back.
    """
    exif = Image.Exif()
    exif.load(exif_bytes)
    exif.pop(_GPS_IFD_TAG, None)
    for tag in _PIXEL_TAGS:
        exif.pop(tag, None)
    directories = [exif]
    if _EXIF_IFD_TAG in exif:
        exif.get_ifd(_EXIF_IFD_TAG).pop(_MAKER_NOTE_TAG, None)  # written back from this cached copy
        directories.append(exif.get_ifd(_EXIF_IFD_TAG))
    for directory in directories:  # any other tag that holds a JPEG: a preview under a private tag
        for tag, value in list(directory.items()):
            if isinstance(value, bytes) and _JPEG_START in value:
                del directory[tag]
    return exif


_JPEG_START = b"\xff\xd8\xff"
"""A JPEG's first bytes (start of image, then a marker): a blob holding them holds a picture."""


_DAMAGED_EXIF = (
    SyntaxError,
    struct.error,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    OSError,
    EOFError,
)
"""What Pillow raises parsing or writing back damaged EXIF (a bad header, a short block, a tag of
the wrong type): with --keep-metadata such a photo stopped the whole batch with a traceback."""


def _exif_not_kept(info: dict | None, error: BaseException) -> None:
    """Say in ``info`` that the source's EXIF is damaged and left out (what it holds cannot be sorted)."""
    if info is not None:
        _note(info, f"EXIF not kept: damaged ({_short(error)})")


def strip_location(exif_bytes: bytes, info: dict | None = None) -> bytes:
    """EXIF without the GPS block or any thumbnail or preview, orientation reset (the pixels are upright).

    Empty for damaged EXIF (`_DAMAGED_EXIF`); ``info`` says so.
    """
    try:
        exif = _exif_to_keep(exif_bytes)
        if _ORIENTATION_TAG in exif:
            exif[_ORIENTATION_TAG] = 1
        return exif.tobytes()
    except _DAMAGED_EXIF as error:
        _exif_not_kept(info, error)
        return b""


def jpeg_roundtrip(pixels: Tensor, quality: int = 75) -> Tensor:
    """Encode a (3, H, W) [0, 1] image as a real JPEG in memory (PIL, 4:2:0) and decode it again.

    This is what an upload site does to a photo; the cloak is checked against it.
    """
    buffer = BytesIO()
    Image.fromarray(to_uint8(pixels)).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return rgb_pixels(decoded).to(pixels.device)


_JPEG_MCU = 16
"""Side of a JPEG minimum coded unit with 4:2:0 chroma, as `jpeg_roundtrip` encodes: each is
transformed and quantised on its own, and decoding reaches at most one chroma sample (2 px) into
its neighbours."""

_SEPARATE_AREAS_UNITS = 3
"""Changed areas this many coded units apart or more are re-encoded as separate windows."""


def jpeg_roundtrip_changed(
    pixels: Tensor, original: Tensor, original_roundtrip: Tensor, quality: int = 75
) -> Tensor:
    """`jpeg_roundtrip` of ``pixels``, which differs from ``original`` only in places, exactly.

    ``original_roundtrip`` is `jpeg_roundtrip(original, quality)`. Only windows of whole coded
    units around what changed (one window per separate area, with a unit of margin) are encoded
    and decoded again; every pixel farther than half a unit from a changed unit is the original's.
    A check that re-encodes a 12 MP photo for each try of a face costs a few hundredths of a
    second instead of half a second, with the same values.
    """
    unit = _JPEG_MCU
    changed = (pixels != original).any(0)
    units = F.max_pool2d(changed[None, None].float(), unit, ceil_mode=True)[0, 0] > 0
    result = original_roundtrip.clone()
    height, width = pixels.shape[-2:]
    for column_start, column_end in _runs(units.any(0), _SEPARATE_AREAS_UNITS):
        for row_start, row_end in _runs(units[:, column_start:column_end].any(1), _SEPARATE_AREAS_UNITS):
            x0, y0, x1, y1 = column_start * unit, row_start * unit, column_end * unit, row_end * unit
            # encoded: a unit of margin (the window starts on the photo's grid); kept: half a unit
            wx0, wy0 = max(0, x0 - unit), max(0, y0 - unit)
            wx1, wy1 = min(width, x1 + unit), min(height, y1 + unit)
            kx0, ky0 = max(0, x0 - unit // 2), max(0, y0 - unit // 2)
            kx1, ky1 = min(width, x1 + unit // 2), min(height, y1 + unit // 2)
            window = jpeg_roundtrip(pixels[:, wy0:wy1, wx0:wx1], quality)
            result[:, ky0:ky1, kx0:kx1] = window[:, ky0 - wy0 : ky1 - wy0, kx0 - wx0 : kx1 - wx0]
    return result


def _runs(flags: Tensor, gap: int) -> list[tuple[int, int]]:
    """[start, end) runs of True in 1-D ``flags``, runs less than ``gap`` apart merged."""
    runs: list[list[int]] = []
    for k in flags.nonzero()[:, 0].tolist():
        if runs and k - runs[-1][1] < gap:
            runs[-1][1] = k + 1
        else:
            runs.append([k, k + 1])
    return [(start, end) for start, end in runs]


LOSSY_FORMATS = ("JPEG", "WEBP", "HEIF")
"""Output formats whose encoder changes the pixels it is given (`as_written` matters for them)."""


def as_written(
    pixels: Tensor, format_name: str, *, source: LoadedImage | None, jpeg_quality: int | None
) -> Tensor:
    """(3, H, W) ``pixels`` as a file written by `write_image` in ``format_name`` will decode.

    The same encoder on the same settings, then decoded upright: a JPEG edited block by block
    quantises a cloak's change again with the input's tables, which a cap measured on the pixels
    alone does not see (face DSSIM 0.0077-0.0080 as cloaked, 0.0085-0.0106 in the file).
    """
    data = encode_image(pixels, format_name, source=source, jpeg_quality=jpeg_quality, info={})
    with Image.open(BytesIO(data)) as opened:
        upright = ImageOps.exif_transpose(opened)
        return rgb_pixels(upright).to(pixels.device)


def stored_as(
    target: str | Path, source: LoadedImage, jpeg_quality: int | None
) -> Callable[[Tensor], Tensor] | None:
    """How ``target``'s file will hold a photo made from ``source`` (`as_written`), or None if as given.

    Lossless formats store the 8-bit pixels as they are; a cloak needs the function only for the
    lossy ones (`LOSSY_FORMATS`).
    """
    format_name = IMAGE_SUFFIXES.get(Path(target).suffix.lower())
    if format_name not in LOSSY_FORMATS:
        return None
    return functools.partial(as_written, format_name=format_name, source=source, jpeg_quality=jpeg_quality)


ALPHA_FORMATS = ("PNG", "WEBP", "TIFF", "HEIF")
"""Output formats that store transparency; a photo with alpha written in another one (JPEG, BMP)
is composited onto white first (`for_output`)."""


def over_white(pixels: Tensor, alpha: Tensor) -> Tensor:
    """(3, H, W) ``pixels`` composited onto white through their (1, H, W) ``alpha``.

    What a browser shows of a transparent PNG on a page, and what most tools flatten to. Without
    it a format with no alpha showed whatever the transparent pixels held, most often black.
    """
    alpha = alpha.to(pixels).clamp(0, 1)
    return pixels * alpha + (1.0 - alpha)


def for_output(
    image: LoadedImage, target: str | Path | None = None, format_name: str | None = None
) -> LoadedImage:
    """``image`` as a file of ``target``'s format (or ``format_name``) can hold it.

    A photo with transparency bound for a format without alpha is composited onto white
    (`over_white`) before any face is looked for or protected, so that detection, the cloak's
    caps and the written file all see what a viewer will; it comes back with ``alpha`` None and
    ``flattened`` set, and its output's record says so. Anything else comes back as it is.
    """
    if format_name is None:
        format_name = IMAGE_SUFFIXES.get(Path(target or "").suffix.lower(), "")
    if image.alpha is None or not format_name or format_name.upper() in ALPHA_FORMATS:
        return image
    return dataclasses.replace(
        image, pixels=over_white(image.pixels, image.alpha), alpha=None, flattened=_see_through(image.alpha)
    )


def _see_through(alpha: Tensor) -> bool:
    """Whether an alpha plane makes any pixel transparent at all.

    An opaque RGBA file (every alpha 255) loses nothing to white; its output said it had lost its
    transparency.
    """
    return bool((alpha < 1).any())


def _note_what_is_left_out(source: LoadedImage, format_name: str, info: dict) -> None:
    """Say in ``info`` what of ``source`` the output cannot hold: frames past the first, alpha."""
    if source.frames > 1:
        info.update(frames_in_source=source.frames, frames_written=1)
        _note(
            info,
            f"only the first of {source.frames} frames was protected and written; "
            f"the other {source.frames - 1} are not in the output",
        )
    if source.flattened:
        info["alpha_flattened"] = "white"
        _note(info, f"transparency composited onto white: {format_name} has none")


def _check_source(source: object) -> None:
    """Refuse a ``source`` that is not a `LoadedImage`: a path given there was an AttributeError."""
    if source is not None and not isinstance(source, LoadedImage):
        kind = type(source).__name__
        raise InvalidInputError(f"source must be the LoadedImage read_image gave, got {kind}")


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
    # the caller's mistake (a usage error), not a file's: a numpy array or a PIL image failed deep
    # in the 8-bit conversion with an AttributeError
    if not isinstance(pixels, Tensor) or not pixels.is_floating_point():
        kind = f"a {pixels.dtype} tensor" if isinstance(pixels, Tensor) else type(pixels).__name__
        raise InvalidInputError(f"pixels must be a (3, H, W) float torch.Tensor in [0, 1], got {kind}")
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise InvalidInputError(f"pixels must be a (3, H, W) float tensor, got shape {tuple(pixels.shape)}")
    low, high = (float(v) for v in torch.aminmax(pixels.detach())) if pixels.numel() else (0.0, 0.0)
    if low < -1 / 255 or high > 1 + 1 / 255:  # (NaN compares False: `levels_8bit` refuses it)
        # levels of 0..255 as floats were clipped to [0, 1]: the photo written nearly all white
        raise InvalidInputError(
            f"pixels must be in [0, 1], got values from {low:.3g} to {high:.3g} (levels of 0..255? "
            "divide by 255)"
        )
    _check_source(source)
    if source is not None and source.alpha is not None and format_name not in ALPHA_FORMATS:
        pixels = over_white(pixels, source.alpha)
        source = dataclasses.replace(source, alpha=None, flattened=_see_through(source.alpha))
    if source is not None:
        _note_what_is_left_out(source, format_name, info)
    if jpeg_quality is not None and format_name not in LOSSY_FORMATS:
        # `--format input` with lossless inputs took the quality without a word
        _note(info, f"quality {jpeg_quality} not used: a {format_name} file is stored losslessly")
    if format_name == "JPEG" and jpeg_quality is None and source is not None:
        try:
            return _jpeg_keeping_blocks(pixels, source, keep_metadata, info)
        except jpeg_blocks.BlocksUnavailable as why:
            info["jpeg_fallback"] = f"whole photo re-encoded at quality {JPEG_QUALITY}: {why}"
    quality = JPEG_QUALITY if jpeg_quality is None else jpeg_quality
    if format_name == "JPEG" and max(pixels.shape[1:]) > JPEG_MAX_SIDE:  # libjpeg said "broken data stream"
        raise ImageWriteError(
            f"a JPEG is at most {JPEG_MAX_SIDE:,} pixels a side, this photo is "
            f"{pixels.shape[2]} x {pixels.shape[1]}: write it as PNG"
        )
    image = _to_pil(pixels, source, format_name)
    buffer = BytesIO()
    try:
        stored_mode = "RGB" if format_name == "WEBP" else image.mode  # WebP has no grey: stored as RGB
        chosen = jpeg_quality is not None
        options = _save_options(format_name, source, keep_metadata, quality, stored_mode, info, chosen)
        image.save(buffer, format=format_name, **options)
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # RuntimeError: libtiff's
        raise ImageWriteError(f"could not encode ({_short(error)})") from None
    info["encoding"] = format_name.lower()
    return buffer.getvalue()


def _locked_temporary_file(folder: Path, suffix: str) -> tuple[int, str]:
    """A new temporary file in ``folder``, locked until it is closed.

    A batch opening its journal removes the temporary files a crash left behind
    (`facecloak.journal`), and took a live write's for one. Between its creation and its lock,
    such a batch may still remove it: the lock is then on a file no longer there (no link left),
    and another is made.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a leftover is told by its name alone, as before
        fcntl = None
    while True:
        handle, temporary = tempfile.mkstemp(prefix=".facecloak-", suffix=suffix, dir=folder)
        if fcntl is None:
            return handle, temporary
        fcntl.flock(handle, fcntl.LOCK_EX)
        if os.fstat(handle).st_nlink > 0:
            return handle, temporary
        os.close(handle)


def write_bytes_atomic(
    path: str | Path,
    data: bytes,
    *,
    protected: Iterable[Path] | ProtectedFiles = (),
    overwrite: bool = False,
) -> Path:
    """Write already encoded bytes to ``path`` atomically (temporary file, fsync, rename).

    The same guarantees as `write_image`: a final name never holds a partial file, an input is
    never replaced, an existing file only with ``overwrite``.
    """
    path = Path(path)
    _check_target(path, protected, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = _locked_temporary_file(path.parent, path.suffix)
    except OSError as error:
        raise ImageWriteError(f"could not write ({_short(error)})", path) from None
    try:
        with os.fdopen(handle, "wb") as stream:  # locked until the rename (`_locked_temporary_file`)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
            os.chmod(temporary, 0o666 & ~_current_umask())
            os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise ImageWriteError(f"could not write ({_short(error)})", path) from None
    except BaseException:  # Ctrl-C mid-write: no hidden half-written file left beside the outputs
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def make_private_folder(path: str | Path) -> Path:
    """Create ``path`` (and its parents) and let only its owner open it (mode 0700).

    For folders of face data: a donor bank's chips and embeddings, the evaluator's embeddings of
    every photo it saw. Under the usual umask (022) they were readable by every user of the
    machine. An existing folder of this user is narrowed too; another user's is left as it is.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    status = path.stat()
    if hasattr(os, "getuid") and status.st_uid == os.getuid() and status.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
