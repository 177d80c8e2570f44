"""The one reader helper behind every foreign model format (dlib ``.dat``, MXNet ``.params``).

A model file we parse ourselves can be truncated, corrupt or simply something else. Every format
reader here derives from `ModelFileReader`, so all of them fail the same way: `fail` *raises*
`facecloak.errors.ModelNotFoundError` with a one-line reason naming the file (a corrupt download
reads as "this model is not available", never as a numpy traceback), and every read is bounds
checked before it touches the data.

Two sources: `ModelFileReader` itself reads from bytes held in memory (dlib files are small and
read with many tiny calls); `StreamReader` reads from an open file (MXNet weights can be hundreds
of megabytes, read in a few large blocks straight into writable buffers).

Example:
    >>> reader = ModelFileReader(bytes([1, 0, 0, 0]), "x.bin", "bad file")
    >>> reader.unpack("I", "a count")
    (1,)
    >>> reader.read_bytes(1, "a tag")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    facecloak.errors.ModelNotFoundError: x.bin: bad file: file truncated while reading a tag ...
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from facecloak.errors import ModelNotFoundError


class ModelFileReader:
    """Bounds-checked sequential little-endian reads over one model file held in memory.

    Args:
        data: the whole file.
        path: where it came from, named in errors.
        error_prefix: what a failure says the file is, e.g. ``"malformed dlib file"``.
    """

    def __init__(
        self, data: bytes, path: str | Path | None = None, error_prefix: str = "malformed model file"
    ) -> None:
        self._data = bytes(data)
        self._path = None if path is None else Path(path)
        self.error_prefix = error_prefix
        self.position = 0

    @property
    def path(self) -> Path | None:
        """The file being read, if known."""
        return self._path

    @property
    def size(self) -> int:
        """Length of the file in bytes."""
        return len(self._data)

    @property
    def remaining(self) -> int:
        """Bytes not yet consumed."""
        return self.size - self.position

    def describe(self, reason: str) -> str:
        """The one-line message for ``reason`` (subclasses may add where in the file)."""
        return f"{self.error_prefix}: {reason}"

    def fail(self, reason: str) -> NoReturn:
        """Raise `ModelNotFoundError` for a malformed file: the one error convention of all readers."""
        raise ModelNotFoundError(self.describe(reason), self._path) from None

    def _check(self, count: int, what: str) -> None:
        if count < 0 or count > self.remaining:
            self.fail(f"file truncated while reading {what} ({count} bytes needed, {self.remaining} left)")

    def read_bytes(self, count: int, what: str = "data") -> bytes:
        """Read the next ``count`` raw bytes."""
        self._check(count, what)
        start = self.position
        self.position += count
        return self._data[start : self.position]

    def read_buffer(self, count: int, what: str = "data") -> bytearray:
        """The next ``count`` bytes as a writable buffer (numpy and torch can share it)."""
        return bytearray(self.read_bytes(count, what))

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        """Read little-endian values in `struct` format ``fmt``."""
        return struct.unpack("<" + fmt, self.read_bytes(struct.calcsize("<" + fmt), what))


class StreamReader(ModelFileReader):
    """`ModelFileReader` over an open binary file of known ``size`` (read once, front to back)."""

    def __init__(self, stream: BinaryIO, size: int, path: str | Path | None, error_prefix: str) -> None:
        super().__init__(b"", path, error_prefix)
        self._stream = stream
        self._size = size

    @property
    def size(self) -> int:
        """Length of the file in bytes."""
        return self._size

    def read_bytes(self, count: int, what: str = "data") -> bytes:
        """Read the next ``count`` raw bytes from the stream."""
        self._check(count, what)
        data = self._stream.read(count)
        if len(data) != count:
            self.fail(f"file truncated while reading {what}")
        self.position += count
        return data

    def read_buffer(self, count: int, what: str = "data") -> bytearray:
        """The next ``count`` bytes read straight into a writable buffer (no intermediate copy)."""
        self._check(count, what)
        buffer = bytearray(count)
        if self._stream.readinto(buffer) != count:
            self.fail(f"file truncated while reading {what}")
        self.position += count
        return buffer
