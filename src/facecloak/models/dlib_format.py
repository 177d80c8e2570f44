"""Read dlib's binary serialization format (``dlib/serialize.h``) in pure Python.

dlib's model files (the face-recognition ResNet, the shape predictors) are nothing but
``dlib::serialize`` calls written one after another, with no table of contents: to read one you
replay the writer's calls in order. `DlibReader` gives one method per primitive the writer uses, so
a model loader reads like the C++ ``serialize`` function it mirrors. Nothing here imports dlib.

Format (as dlib writes it, checked against ``dlib/serialize.h``, ``dlib/float_details.h`` and
``dlib/cuda/tensor.h``):
    - integer: a control byte, whose low 4 bits give the number of magnitude bytes (1 to 8) and
      whose bit 0x80 marks a negative value, then that many little-endian bytes. Zero is ``01 00``.
      Unsigned integers are written the same way, without the sign bit.
    - bool: one ASCII byte, ``'1'`` or ``'0'``.
    - string: an unsigned integer length, then the raw bytes (no terminator).
    - float / double: an int64 mantissa *then* an int16 exponent, value ``mantissa * 2**exponent``
      (the comment in ``serialize.h`` lists them the other way round); exponents 32000, 32001 and
      32002 mean +inf, -inf and NaN.
    - ``std::vector<T>``: an unsigned integer length, then each element.
    - ``dlib::matrix<T>``: ``-nr`` and ``-nc`` as signed integers (negated to mark the newer
      format; older files have them positive), then the elements row by row.
    - ``dlib::vector<T, 2>`` (a point): ``x`` then ``y``.
    - DNN tensor (``resizable_tensor``): version 2, the four dimensions (samples, k, nr, nc) as
      integers, then the raw little-endian float32 data, not the float format above.
    - DNN ``alias_tensor``: version 1 and the four dimensions, no data (a view into ``params``).

Every failure (truncated file, impossible size, unexpected tag) raises
`facecloak.errors.ModelNotFoundError` with a one-line reason naming the byte offset, so a corrupt
download reads as "this model is not available" rather than a numpy traceback.

Example:
    >>> reader = DlibReader(bytes([0x01, 0x05, ord("1"), 0x01, 0x02]) + b"hi")
    >>> reader.read_int(), reader.read_bool(), reader.read_string()
    (5, True, 'hi')
    >>> reader.expect_end()

"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import numpy as np

from facecloak.errors import ModelNotFoundError

__all__ = ["DlibReader"]

T = TypeVar("T")

FLOAT_EXPONENT_INF = 32000
"""``float_details::is_inf``: the value is +infinity."""
FLOAT_EXPONENT_NINF = 32001
"""``float_details::is_ninf``: the value is -infinity."""
FLOAT_EXPONENT_NAN = 32002
"""``float_details::is_nan``: the value is NaN."""
TENSOR_VERSION = 2
"""Version dlib writes before a ``resizable_tensor``."""
ALIAS_TENSOR_VERSION = 1
"""Version dlib writes before an ``alias_tensor``."""
MAX_STRING_BYTES = 1 << 20
"""Longest string we accept; dlib only writes short version tags, so more means a corrupt file."""


class DlibReader:
    """Sequential reader over the bytes of one dlib-serialized file.

    Each ``read_*`` consumes one serialized object and advances `position`. Readers for
    containers (`read_list`, `read_matrix`) take the element reader as an argument, because
    dlib's format carries no type information: the caller knows what was written.

    Args:
        data: the whole file.
        path: where it came from, used only in error messages.

    """

    def __init__(self, data: bytes, path: str | Path | None = None) -> None:
        self._data = bytes(data)
        self._path = None if path is None else Path(path)
        self.position = 0

    @classmethod
    def from_file(cls, path: str | Path) -> DlibReader:
        """Read the whole file at ``path``; raise `ModelNotFoundError` if it cannot be read."""
        try:
            return cls(Path(path).read_bytes(), path)
        except OSError as error:
            reason = f"cannot read dlib model file ({error.strerror or error})"
            raise ModelNotFoundError(reason, path) from None

    @property
    def path(self) -> Path | None:
        """The file being read, if known."""
        return self._path

    @property
    def remaining(self) -> int:
        """Bytes not yet consumed."""
        return len(self._data) - self.position

    def fail(self, reason: str) -> NoReturn:
        """Raise `ModelNotFoundError` for a malformed file, with the current byte offset."""
        raise ModelNotFoundError(f"malformed dlib file: {reason} at byte {self.position}", self._path)

    def expect_end(self) -> None:
        """Check that the whole file has been consumed: trailing bytes mean we misread it."""
        if self.remaining:
            self.fail(f"{self.remaining} unexpected trailing bytes")

    # ----------------------------------------------------------------------------------------------
    # primitives

    def read_bytes(self, count: int, what: str = "data") -> bytes:
        """Read the next ``count`` raw bytes."""
        if count < 0 or count > self.remaining:
            self.fail(f"file truncated while reading {what} ({count} bytes needed, {self.remaining} left)")
        start = self.position
        self.position += count
        return self._data[start : self.position]

    def _read_magnitude(self, what: str) -> tuple[int, bool]:
        # The hot path of every file (a shape predictor holds a million floats): kept lean.
        data, start = self._data, self.position
        if start >= len(data):
            self.fail(f"file truncated while reading {what}")
        control = data[start]
        size = control & 0x0F
        if size == 0 or size > 8:
            self.fail(f"bad integer control byte 0x{control:02x} while reading {what}")
        end = start + 1 + size
        if end > len(data):
            self.fail(f"file truncated while reading {what}")
        self.position = end
        return int.from_bytes(data[start + 1 : end], "little"), control >= 0x80

    def read_int(self, what: str = "an integer") -> int:
        """Read a signed integer of any width (``int``, ``long``, ``int64``...)."""
        magnitude, negative = self._read_magnitude(what)
        return -magnitude if negative else magnitude

    def read_uint(self, what: str = "an unsigned integer") -> int:
        """Read an unsigned integer (``unsigned long``, ``size_t``...); a sign bit is an error, as in dlib."""
        start = self.position
        magnitude, negative = self._read_magnitude(what)
        if negative:
            self.position = start
            self.fail(f"negative value while reading {what}")
        return magnitude

    def read_bool(self, what: str = "a bool") -> bool:
        """Read a bool, stored as ASCII ``'1'`` or ``'0'``."""
        byte = self.read_bytes(1, what)
        if byte not in (b"0", b"1"):
            self.position -= 1
            self.fail(f"bad bool byte 0x{byte[0]:02x} while reading {what}")
        return byte == b"1"

    def read_string(self, what: str = "a string") -> str:
        """Read a ``std::string`` (length, then bytes), decoded as UTF-8."""
        length = self.read_uint(what)
        if length > MAX_STRING_BYTES:
            self.fail(f"implausible string length {length} while reading {what}")
        raw = self.read_bytes(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.position -= length
            self.fail(f"undecodable bytes while reading {what}")

    def expect_string(self, *allowed: str) -> str:
        """Read a version tag that must be one of ``allowed``; return which one it was."""
        start = self.position
        tag = self.read_string("a version tag")
        if tag not in allowed:
            self.position = start
            self.fail(f"expected {' or '.join(map(repr, allowed))}, found {tag[:40]!r}")
        return tag

    def expect_int(self, *allowed: int, what: str = "a version number") -> int:
        """Read an integer (usually a version number) that must be one of ``allowed``."""
        start = self.position
        value = self.read_int(what)
        if value not in allowed:
            self.position = start
            self.fail(f"expected {what} in {sorted(allowed)}, found {value}")
        return value

    def read_float(self, what: str = "a float") -> float:
        """Read a ``float`` or ``double``: int64 mantissa, then int16 exponent.

        dlib also reads an older ASCII float format (recognisable by bits 0x70 of the first
        byte); no model file we load uses it, so it is rejected rather than guessed at.
        """
        if self.remaining >= 1 and self._data[self.position] & 0x70:
            self.fail(f"old ASCII float encoding (unsupported) while reading {what}")
        mantissa = self.read_int(what)
        exponent = self.read_int(what)
        if exponent == FLOAT_EXPONENT_INF:
            return math.inf
        if exponent == FLOAT_EXPONENT_NINF:
            return -math.inf
        if exponent == FLOAT_EXPONENT_NAN:
            return math.nan
        if not -(1 << 15) <= exponent < FLOAT_EXPONENT_INF:
            self.fail(f"float exponent {exponent} out of range while reading {what}")
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            self.fail(f"float overflow while reading {what}")

    def read_floats(self, count: int, what: str = "floats") -> list[float]:
        """``count`` consecutive floats, as `read_float` would read them one by one, but faster.

        Shape predictors store about a million floats this way; the common case (a plain
        mantissa and exponent) is decoded inline, and anything unusual (special values, a
        malformed or truncated entry) goes through `read_float` for its exact handling and error.
        """
        data, position, size = self._data, self.position, len(self._data)
        values: list[float] = []
        for _ in range(count):
            mantissa_control = data[position] if position < size else 0
            exponent_at = position + 1 + (mantissa_control & 0x0F)
            exponent_control = data[exponent_at] if exponent_at < size else 0
            end = exponent_at + 1 + (exponent_control & 0x0F)
            plain = (
                not (mantissa_control | exponent_control) & 0x70
                and 0 < mantissa_control & 0x0F <= 8
                and 0 < exponent_control & 0x0F <= 2
                and end <= size
            )
            if plain:
                mantissa = int.from_bytes(data[position + 1 : exponent_at], "little")
                exponent = int.from_bytes(data[exponent_at + 1 : end], "little")
                plain = exponent < 960 or exponent_control & 0x80  # else special or overflowing
            if plain:
                mantissa = -mantissa if mantissa_control & 0x80 else mantissa
                values.append(math.ldexp(mantissa, -exponent if exponent_control & 0x80 else exponent))
                position = end
            else:
                self.position = position
                values.append(self.read_float(what))
                position = self.position
        self.position = position
        return values

    # ----------------------------------------------------------------------------------------------
    # containers

    def read_list(self, read_item: Callable[[], T], what: str = "a std::vector") -> list[T]:
        """Read a ``std::vector``: its length, then ``read_item()`` for each element."""
        length = self.read_uint(what)
        if length > self.remaining:  # every element takes at least one byte
            self.fail(f"implausible length {length} while reading {what}")
        return [read_item() for _ in range(length)]

    def read_matrix(self, read_element: Callable[[], float] | None = None) -> np.ndarray:
        """Read a ``dlib::matrix`` as an ``(nr, nc)`` float32 array (elements via ``read_element``).

        Args:
            read_element: reader of one element; default `read_float` (``matrix<float>`` and
                ``matrix<double>``; doubles are narrowed to float32).

        """
        rows = abs(self.read_int("matrix rows"))
        cols = abs(self.read_int("matrix columns"))
        if rows * cols > self.remaining:  # every element takes at least one byte
            self.fail(f"implausible matrix size {rows}x{cols}")
        if read_element is None:
            values = self.read_floats(rows * cols, "matrix elements")
        else:
            values = [read_element() for _ in range(rows * cols)]
        return np.asarray(values, dtype=np.float32).reshape(rows, cols)

    def read_column_vector(self) -> np.ndarray:
        """Read a ``dlib::matrix<float, 0, 1>`` as a 1-D float32 array."""
        start = self.position
        matrix = self.read_matrix()
        if matrix.shape[1] != 1 and matrix.size:
            self.position = start
            self.fail(f"expected a column vector, found a {matrix.shape[0]}x{matrix.shape[1]} matrix")
        return matrix.reshape(-1)

    def read_point2(self) -> tuple[float, float]:
        """Read a ``dlib::vector<float, 2>`` (also ``dpoint``) as ``(x, y)``."""
        return self.read_float("a point's x"), self.read_float("a point's y")

    # ----------------------------------------------------------------------------------------------
    # DNN tensors

    def read_tensor(self) -> np.ndarray:
        """Read a DNN ``resizable_tensor`` as a ``(num_samples, k, nr, nc)`` float32 array."""
        self.expect_int(TENSOR_VERSION, what="the tensor version")
        shape = tuple(self.read_int("a tensor dimension") for _ in range(4))
        if min(shape) < 0:
            self.fail(f"negative tensor shape {shape}")
        count = math.prod(shape)
        raw = self.read_bytes(4 * count, f"a tensor of shape {shape}")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def read_alias_tensor(self) -> tuple[int, int, int, int]:
        """Read a DNN ``alias_tensor``: only its shape, ``(num_samples, k, nr, nc)``."""
        self.expect_int(ALIAS_TENSOR_VERSION, what="the alias_tensor version")
        shape = tuple(self.read_int("an alias_tensor dimension") for _ in range(4))
        if min(shape) < 0:
            self.fail(f"negative alias_tensor shape {shape}")
        return shape  # type: ignore[return-value]


def locate_package_model(filename: str) -> Path | None:
    """Find ``filename`` among the models of the installed ``face_recognition_models`` package.

    The package is located with `importlib.util.find_spec`, never imported: its ``__init__``
    needs ``pkg_resources``, which recent setuptools no longer provides.
    """
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "models" / filename
    return path if path.is_file() else None
