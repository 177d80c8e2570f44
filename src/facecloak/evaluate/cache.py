"""The disk cache of clean photos' embeddings per attacker, and embedding files through it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from facecloak import io
from facecloak.errors import ImageWriteError

if TYPE_CHECKING:
    from facecloak.evaluate.attackers import Attacker

CACHE_VERSION = 2
"""Bump when the embedding pipeline changes in a way cards and settings do not show."""

FILES_PER_CALL = 32
"""Clean files decoded and embedded together."""


class EmbeddingCache:
    """Embeddings of clean files per attacker, kept on disk so repeated evaluations skip them."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.memory: dict[str, dict[str, np.ndarray]] = {}

    def _file(self, attacker: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{attacker}.npz"

    def _load(self, attacker: str) -> dict[str, np.ndarray]:
        if attacker not in self.memory:
            self.memory[attacker] = _read_table(self._file(attacker))
        return self.memory[attacker]

    @staticmethod
    def key(path: Path) -> str:
        """Cache key: the file's path, size and modification time."""
        stat = path.stat()
        return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()

    def get(self, attacker: str, path: Path) -> np.ndarray | None:
        """The cached embedding of ``path``, if any."""
        return self._load(attacker).get(self.key(path))

    def put(self, attacker: str, path: Path, embedding: np.ndarray) -> None:
        """Remember an embedding (saved by `save`)."""
        self._load(attacker)[self.key(path)] = embedding

    def save(self) -> None:
        """Write every attacker's embeddings to the cache folder."""
        if self.folder is None:
            return
        try:
            io.make_private_folder(self.folder)  # every photo's embedding: biometric data
        except OSError as error:  # it was an OSError traceback (a file where a folder is named)
            reason = f"cannot create the embedding cache folder ({error.strerror})"
            raise ImageWriteError(reason, self.folder) from None
        for attacker, table in self.memory.items():
            buffer = BytesIO()
            np.savez(buffer, **table)
            io.write_bytes_atomic(self._file(attacker), buffer.getvalue(), overwrite=True)


def _read_table(path: Path | None) -> dict[str, np.ndarray]:
    """A cache file's embeddings; none from a file that is missing or damaged (it is rewritten).

    A damaged file (cut short by a full disk, or not a cache at all) ended the evaluation with
    numpy's traceback, after its protect phase: a cache holds nothing that cannot be computed again.
    """
    if path is None or not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as table:
            return {key: table[key] for key in table.files}
    except Exception:  # noqa: BLE001 - zipfile, numpy and OS errors alike: computed again
        return {}


def embed_files(
    attacker: Attacker, paths: list[Path], cache: EmbeddingCache, progress: Callable[[int, int], None]
) -> Tensor:
    """Embeddings of clean files, from the cache where possible (NaN rows: no face found).

    Raises:
        FacecloakError: a file cannot be read (naming it). It gave a NaN row, silently: an
            unreadable probe counted as a miss, i.e. as protection the protection never gave.
    """
    out = torch.full((len(paths), attacker.dim), math.nan)
    missing = []
    fingerprint = attacker.fingerprint  # once: it looks at the model's files
    for i, path in enumerate(paths):
        cached = cache.get(fingerprint, path)
        if cached is None:
            missing.append(i)
        else:
            out[i] = torch.from_numpy(cached)
    for start in range(0, len(missing), FILES_PER_CALL):
        readable = missing[start : start + FILES_PER_CALL]
        images = [io.read_image(paths[i]).pixels for i in readable]
        if readable:
            out[readable] = attacker.embed(images)
        for i in missing[start : start + FILES_PER_CALL]:
            cache.put(fingerprint, paths[i], out[i].numpy())
        progress(min(start + FILES_PER_CALL, len(missing)), len(missing))
    return out
