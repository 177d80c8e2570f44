"""JPEG outputs that keep every block the protection did not touch, bit for bit.

Saving a cloaked or anonymised JPEG the usual way decodes the whole photo and encodes it again:
every 8x8 block goes through another lossy generation, also the ones far from any face (at
quality 95 that changed about half the pixels of a sample photo, by up to 14 levels). Here the
photo is edited in the JPEG's own domain instead: the input's quantised DCT coefficients are
read (jpeglib, i.e. libjpeg), the new pixels are encoded with the input's own quantisation
tables and chroma sampling, and their coefficients replace the input's only in the MCUs
(minimum coded units: 8x8 pixels without chroma subsampling, 16x16 at 4:2:0, 16x8 at 4:2:2)
that contain a changed pixel. Every other MCU keeps the input's exact coefficients, so any
decoder gives it exactly the pixels it gave before.

One exception, stated rather than hidden: decoders that upsample subsampled chroma smoothly
("fancy upsampling", the default of libjpeg-turbo and so of PIL) blend each chroma sample with
its neighbour across MCU borders, so pixels next to a re-encoded MCU can change by a level or
two. `BlockEdit.affected` is therefore the re-encoded MCUs dilated by one MCU when the chroma is
subsampled; outside it every pixel is identical (checked in tests/test_jpeg_blocks.py and
measured by scripts/check_jpeg_blocks.py).

Only baseline or progressive 8-bit Huffman JPEGs in YCbCr or greyscale take this path; anything
else (no jpeglib, CMYK, arithmetic coding, a size change) raises `BlocksUnavailable` and the
caller re-encodes the whole photo as before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import jpeglib

    JPEGLIB_AVAILABLE = True
except ImportError:  # pragma: no cover - jpeglib is a dependency; a broken install falls back
    JPEGLIB_AVAILABLE = False


_SCRATCH_PREFIX = "facecloak-scratch-"
_call_scratch: list[str] = []
"""The scratch folder of the jpeglib call under way (one at a time: `_LIBJPEG`)."""
_swept: set[str] = set()
"""Temporary folders this process has cleared of killed processes' scratch folders."""


@contextmanager
def _scratch_for_call() -> Iterator[str]:
    """A folder only this user can open, for the files libjpeg reads and writes in one call.

    jpeglib hands libjpeg every JPEG through a named temporary file (the whole upload, its GPS and
    thumbnail included), removed after the call but left behind when the process is killed
    mid-call. Its files go here instead: mode 0700, in memory (``/dev/shm``) unless ``TMPDIR``
    names another place, removed when the call ends; a folder a killed process left is removed
    by the next process that makes one (`_remove_left_over_scratch`).
    """
    base = _scratch_base()
    if base not in _swept:
        _remove_left_over_scratch(base)
        _swept.add(base)
    folder = tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=base)
    _call_scratch.append(folder)
    try:
        yield folder
    finally:
        _call_scratch.remove(folder)
        shutil.rmtree(folder, ignore_errors=True)


def scratch_folder() -> str | None:
    """The folder of the jpeglib call under way, else None (the usual temporary folder)."""
    return _call_scratch[-1] if _call_scratch else None


def _scratch_base() -> str:
    """``TMPDIR`` where the user set it, else ``/dev/shm`` (memory) where it is writable, else the usual."""
    shared_memory = "/dev/shm"
    if (
        not os.environ.get("TMPDIR")
        and os.path.isdir(shared_memory)
        and os.access(shared_memory, os.W_OK | os.X_OK)
    ):
        return shared_memory
    return tempfile.gettempdir()


def _remove_left_over_scratch(base: str) -> None:
    """Remove this user's scratch folders in ``base`` whose process no longer runs."""
    if not hasattr(os, "getuid"):  # Windows: os.kill(pid, 0) there would end the process, not test it
        return
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not name.startswith(_SCRATCH_PREFIX):
            continue
        pid_text = name[len(_SCRATCH_PREFIX) :].split("-", 1)[0]
        try:
            if not pid_text.isdigit() or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or _process_runs(int(pid_text)):
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that number
        return True
    return True


class _ScratchTemporaryFiles:
    """`tempfile` as jpeglib's modules see it: their named files land in `scratch_folder`."""

    def __getattr__(self, name: str):
        return getattr(tempfile, name)

    @staticmethod
    def NamedTemporaryFile(*args, **kwargs):  # noqa: N802 - the name jpeglib calls
        kwargs["dir"] = scratch_folder()
        return tempfile.NamedTemporaryFile(*args, **kwargs)


if JPEGLIB_AVAILABLE:
    import importlib

    for _module_name in ("dct_jpeg", "spatial_jpeg", "progressive_jpeg", "functional"):
        try:
            _module = importlib.import_module(f"jpeglib.{_module_name}")
        except ImportError:  # pragma: no cover - another jpeglib layout
            continue
        if getattr(_module, "tempfile", None) is tempfile:
            _module.tempfile = _ScratchTemporaryFiles()


class BlocksUnavailable(Exception):
    """A JPEG that cannot be edited block by block; the message (one line) says why."""


@dataclass(frozen=True)
class BlockEdit:
    """Which MCUs of a JPEG were re-encoded.

    Attributes:
        mcu_size: (height, width) of one MCU in pixels (8 or 16 each).
        replaced: (MCU rows, MCU columns) bool, True where the coefficients were replaced.
        subsampled: the chroma is subsampled (fancy upsampling can reach one pixel past an MCU).
    """

    mcu_size: tuple[int, int]
    replaced: np.ndarray
    subsampled: bool

    @property
    def mcus_replaced(self) -> int:
        """MCUs whose coefficients were replaced."""
        return int(self.replaced.sum())

    @property
    def mcus_total(self) -> int:
        """MCUs in the photo."""
        return int(self.replaced.size)

    def affected(self, height: int, width: int) -> np.ndarray:
        """(height, width) bool: pixels that may differ from the input when decoded.

        The replaced MCUs, dilated by one MCU in every direction when the chroma is subsampled
        (a decoder's smooth chroma upsampling blends across MCU borders). Every pixel outside
        this mask decodes exactly as in the input.
        """
        region = self.replaced
        if self.subsampled and region.any():
            padded = np.pad(region, 1)
            rows, cols = region.shape
            region = np.zeros_like(region)
            for dy in range(3):
                for dx in range(3):
                    region |= padded[dy : dy + rows, dx : dx + cols]
        mcu_h, mcu_w = self.mcu_size
        pixels = np.repeat(np.repeat(region, mcu_h, axis=0), mcu_w, axis=1)
        return pixels[:height, :width]

    def summary(self) -> dict:
        """JSON-ready counts."""
        return {
            "mcus_reencoded": self.mcus_replaced,
            "mcus_total": self.mcus_total,
            "mcu_size": list(self.mcu_size),
        }


def changed_mcus(before: np.ndarray, after: np.ndarray, mcu_size: tuple[int, int]) -> np.ndarray:
    """(MCU rows, MCU columns) bool: MCUs holding at least one pixel that differs.

    Args:
        before: (H, W) or (H, W, C) uint8 image.
        after: the same shape.
        mcu_size: (height, width) of an MCU in pixels.

    Example:
        >>> a = np.zeros((20, 20), np.uint8); b = a.copy(); b[17, 3] = 1
        >>> changed_mcus(a, b, (16, 16)).tolist()
        [[False, False], [True, False]]
    """
    differs = before != after
    if differs.ndim == 3:
        differs = differs.any(axis=2)
    height, width = differs.shape
    mcu_h, mcu_w = mcu_size
    rows, cols = -(-height // mcu_h), -(-width // mcu_w)
    padded = np.zeros((rows * mcu_h, cols * mcu_w), dtype=bool)
    padded[:height, :width] = differs
    return padded.reshape(rows, mcu_h, cols, mcu_w).any(axis=(1, 3))


_LIBJPEG = threading.Lock()
"""jpeglib's calls, one at a time in the process: it is not thread-safe. Two HTTP threads of the
service editing JPEGs at once (one in ``read_dct``, one in ``read_jpeg_markers``) killed the server
with a bus error, or ``malloc(): unaligned tcache chunk detected``: 2 of 9 server runs of 400
requests from 8 clients; the pipeline's writer threads could do the same."""


def splice_jpeg(source: str | Path | bytes, before: np.ndarray, after: np.ndarray) -> tuple[bytes, BlockEdit]:
    """Encode ``after`` as a JPEG that keeps every MCU of ``source`` where it equals ``before``.

    Args:
        source: the input JPEG: its file, or its bytes.
        before: (H, W, 3) uint8, the input as decoded (stored orientation, no EXIF rotation).
        after: (H, W, 3) uint8, the new pixels, same orientation and size.

    Returns:
        The new file's bytes (SOI, JFIF header, tables, scan; no EXIF, ICC or comment: the
        caller adds the metadata it means to keep), and which MCUs were re-encoded.

    Raises:
        BlocksUnavailable: jpeglib missing, or a JPEG kind this cannot edit (the reason says which).
    """
    if not JPEGLIB_AVAILABLE:
        raise BlocksUnavailable("jpeglib is not installed")
    if before.shape != after.shape or before.ndim != 3:
        raise BlocksUnavailable("the output's size differs from the input's")
    with _LIBJPEG, _scratch_for_call():  # milliseconds for a photo; a crash of the whole process otherwise
        return _splice(source, before, after)


def _splice(source: str | Path | bytes, before: np.ndarray, after: np.ndarray) -> tuple[bytes, BlockEdit]:
    """`splice_jpeg`'s work, under `_LIBJPEG`."""
    original = _read_dct(source)
    height, width = before.shape[:2]
    if (original.height, original.width) != (height, width):
        raise BlocksUnavailable("the input's stored size differs from its decoded size")
    grey = original.num_components == 1
    if grey and not (after == after[..., :1]).all():
        raise BlocksUnavailable("colour was added to a greyscale JPEG")
    factors = np.asarray(original.samp_factor).reshape(-1, 2)  # (v, h) per component
    mcu_size = (8 * int(factors[:, 0].max()), 8 * int(factors[:, 1].max()))
    replaced = changed_mcus(before, after, mcu_size)
    subsampled = bool((factors != factors[0]).any())
    if replaced.any():
        encoded = _encode_like(original, after[..., :1] if grey else after)
        for name, (v, h) in zip(("Y", "Cb", "Cr"), factors.tolist()):
            ours, theirs = getattr(original, name), getattr(encoded, name)
            if ours is None or theirs is None or ours.shape != theirs.shape:
                raise BlocksUnavailable("re-encoding gave a different block layout")
            blocks = np.repeat(np.repeat(replaced, v, axis=0), h, axis=1)[: ours.shape[0], : ours.shape[1]]
            ours[blocks] = theirs[blocks]
    data = _write_dct(original)
    return data, BlockEdit(mcu_size, replaced, subsampled)


def _read_dct(source: str | Path | bytes):
    try:
        if isinstance(source, bytes):  # libjpeg (through jpeglib) reads files only
            jpeg = _read_dct_of_bytes(source)
        elif not str(source).isascii() and not _utf8(str(source)):
            # jpeglib passes the name on as UTF-8: a name in another encoding (caf\xe9.jpg from an
            # old camera card) is read as its bytes
            jpeg = _read_dct_of_bytes(Path(source).read_bytes())
        else:
            jpeg = jpeglib.read_dct(str(source))
            jpeg.load()
    except Exception as error:  # libjpeg reports unsupported kinds (arithmetic, 12-bit) many ways
        raise BlocksUnavailable(f"libjpeg cannot read its coefficients ({_short(error)})") from None
    space = str(jpeg.jpeg_color_space)
    if not (
        (jpeg.num_components == 3 and space.endswith("YCbCr"))
        or (jpeg.num_components == 1 and space.endswith("GRAYSCALE"))
    ):
        raise BlocksUnavailable(f"{jpeg.num_components}-component {space.split('_')[-1]} JPEG")
    return jpeg


def _utf8(text: str) -> bool:
    """Whether ``text`` (a file name, as Python decoded it) is valid UTF-8 text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept as surrogates
        return False
    return True


def _read_dct_of_bytes(data: bytes):
    """`jpeglib.read_dct` of an in-memory JPEG (an upload: the unprotected photo).

    Read through an anonymous in-memory file where the system has one (``memfd``, as
    `facecloak.io.read_image_bytes` reads it), elsewhere a temporary folder. Either way jpeglib's
    ``load`` then hands the bytes to libjpeg through a named file: in `scratch_folder`, private to
    this user and in memory by default.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        handle = os.memfd_create("facecloak-jpeg", getattr(os, "MFD_CLOEXEC", 0))
        with os.fdopen(handle, "w+b") as stream:
            stream.write(data)
            stream.flush()
            jpeg = jpeglib.read_dct(f"/proc/self/fd/{stream.fileno()}")
            jpeg.load()
            return jpeg
    with tempfile.TemporaryDirectory(dir=scratch_folder()) as folder:  # pragma: no cover - macOS, Windows
        path = os.path.join(folder, "source.jpg")
        Path(path).write_bytes(data)
        jpeg = jpeglib.read_dct(path)
        jpeg.load()
        return jpeg


def _encode_like(original, pixels: np.ndarray):
    """Encode ``pixels`` with ``original``'s quantisation tables and sampling; read back its DCT."""
    spatial = jpeglib.from_spatial(np.ascontiguousarray(pixels))
    if original.num_components == 3:
        spatial.samp_factor = original.samp_factor
    with tempfile.TemporaryDirectory(dir=scratch_folder()) as folder:
        path = os.path.join(folder, "encoded.jpg")
        try:
            spatial.write_spatial(
                path, qt=original.qt, quant_tbl_no=original.quant_tbl_no, dct_method=jpeglib.JDCT_ISLOW
            )
            encoded = jpeglib.read_dct(path)
            encoded.load()
        except Exception as error:  # libjpeg's messages for odd tables or sizes
            raise BlocksUnavailable(f"libjpeg could not encode the new pixels ({_short(error)})") from None
    if not np.array_equal(encoded.qt, original.qt):
        raise BlocksUnavailable("libjpeg did not keep the input's quantisation tables")
    return encoded


def _write_dct(jpeg) -> bytes:
    """The coefficients as a baseline JPEG with optimised Huffman tables and no APPn/COM markers."""
    jpeg.markers = []  # EXIF, XMP, ICC, comments: the caller decides what to keep
    with tempfile.TemporaryDirectory(dir=scratch_folder()) as folder:
        path = os.path.join(folder, "spliced.jpg")
        try:
            jpeg.write_dct(path, flags=["OPTIMIZE_CODING"])
        except Exception as error:
            raise BlocksUnavailable(f"libjpeg could not write the coefficients ({_short(error)})") from None
        return Path(path).read_bytes()


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:100] or type(error).__name__
