"""A disk cache of model files parsed into numpy arrays, so slow parsers run once per file.

dlib's shape predictor is a million floats in dlib's own variable-length encoding: parsing it in
Python costs about 4 s of CPU for the 5-point file (the 68-point file is 11 times larger). The
parsed arrays are saved as one ``.npz`` under ``$XDG_CACHE_HOME/facecloak/parsed/`` (default
``~/.cache/facecloak/parsed/``) and read back in milliseconds with ``allow_pickle=False``, so a
cache file can hold nothing but plain arrays.

The key is the source file's size, modification time and SHA-256 (hashing the 5-point file takes
about 10 ms), plus the parser's name and format version: a changed or replaced file, or a new
parser, never reads a stale entry; a file replaced while it was being parsed is not cached under
the key of the one it replaced. A missing, truncated or otherwise unreadable cache file is
ignored and rewritten; a cache folder that cannot be written to only costs the parse. Writes go
to a temporary file in the same folder, then ``os.replace``: a reader never sees half a file.

Example:
    >>> load_parsed(path, "shape-predictor-v1", parse, ShapePredictor.from_arrays)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import TypeVar

import numpy as np

from facecloak.errors import FacecloakError
from facecloak.io import write_bytes_atomic

__all__ = ["file_key", "load_parsed", "parsed_cache_dir"]

T = TypeVar("T")

_HASH_CHUNK_BYTES = 1 << 20


def facecloak_cache_dir() -> Path:
    """The cache folder: ``$XDG_CACHE_HOME/facecloak`` (default ``~/.cache/facecloak``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "facecloak"


def parsed_cache_dir() -> Path:
    """Where parsed model files are cached."""
    return facecloak_cache_dir() / "parsed"


def file_key(path: Path) -> str:
    """Hex digest of ``path``'s size, modification time (ns) and SHA-256 of its contents."""
    stat = path.stat()
    content = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            content.update(block)
    return hashlib.sha256(f"{stat.st_size}|{stat.st_mtime_ns}|{content.hexdigest()}".encode()).hexdigest()


def load_parsed(
    source: Path | str,
    parser: str,
    parse: Callable[[Path], dict[str, np.ndarray]],
    build: Callable[[dict[str, np.ndarray]], T],
) -> T:
    """``build(parse(source))``, with ``parse``'s arrays read from the cache when it holds this exact file.

    Args:
        source: the model file.
        parser: name and format version of ``parse`` (``"shape-predictor-v1"``); change it
            whenever ``parse``'s output changes, so old entries are not read.
        parse: the slow parser, file -> named arrays; it may raise (nothing is cached then).
        build: arrays -> the model; it raises ``ValueError``, ``KeyError`` or ``TypeError`` on
            arrays that do not make one, and a cache entry it rejects is parsed again.

    Returns:
        What ``build`` returns.
    """
    source = Path(source)
    key = _key_of(source)
    if key is None:
        return build(parse(source))  # missing or unreadable: the parser says why, in its own words
    target = parsed_cache_dir() / f"{source.name}.{parser}.{key[:32]}.npz"
    try:
        with np.load(target, allow_pickle=False) as stored:
            return build({name: stored[name] for name in stored.files})
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        pass  # absent, unreadable or not what build expects: parse again and rewrite it
    arrays = parse(source)
    model = build(arrays)
    if _key_of(source) == key:  # else the file changed after it was hashed: these arrays are not key's
        _save_atomically(target, arrays)
    return model


def _key_of(source: Path) -> str | None:
    """`file_key`, or None for a file that can no longer be read."""
    try:
        return file_key(source)
    except OSError:
        return None


def _save_atomically(target: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``target`` atomically; give up quietly if the folder is read-only."""
    buffer = BytesIO()
    np.savez(buffer, **arrays)
    try:
        write_bytes_atomic(target, buffer.getvalue(), overwrite=True)
    except FacecloakError:
        pass  # caching is an optimisation: a read-only or full disk costs only the parse
