"""Typed, one-line errors for everything a user can get wrong.

Every failure a user can cause is a `FacecloakError`; its `str()` is one line,
``"<path>: <reason>"`` when a file is involved, so the CLI and a batch can print it
as is and go on with the next file.
"""

from __future__ import annotations

from pathlib import Path


class FacecloakError(Exception):
    """Base class of all user-facing facecloak errors."""

    def __init__(self, reason: str, path: str | Path | None = None) -> None:
        self.reason = " ".join(str(reason).split())  # always one line
        self.path = None if path is None else str(path)
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ImageReadError(FacecloakError):
    """An input file could not be read as an image (missing, truncated, hostile, unsupported)."""


class ImageWriteError(FacecloakError):
    """An output could not be written (would overwrite an input, disk error, bad format)."""


class ModelNotFoundError(FacecloakError):
    """A face model is unknown, or its weights are not available on this machine."""


class InvalidInputError(FacecloakError):
    """A tensor or option given to the Python API is malformed."""


class DonorBankError(FacecloakError):
    """A donor bank is missing, empty, damaged, or was built with other face models."""
