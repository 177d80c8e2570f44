"""Typed, one-line errors for everything a user can get wrong.

Every failure a user can cause is a `FacecloakError`; its `str()` is one line,
``"<path>: <reason>"`` when a file is involved, so the CLI and a batch can print it
as is and go on with the next file. Each class carries the exit code the CLI ends with
(`exit_code`): 2 for what the user asked wrongly, 3 for what failed.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
"""Every face was protected."""
EXIT_UNPROTECTED = 1
"""Finished, but a photo had no face or a face fell short of its target."""
EXIT_USAGE = 2
"""The command line or an option was wrong (click uses 2 for its own usage errors too)."""
EXIT_FAILED = 3
"""A file or a model failed."""
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C (128 + SIGINT, as shells report it): not to be read as 1, a face NOT protected."""


class FacecloakError(Exception):
    """Base class of all user-facing facecloak errors."""

    exit_code = EXIT_FAILED

    def __init__(self, reason: str, path: str | Path | None = None) -> None:
        self.reason = " ".join(str(reason).split())  # always one line
        self.path = None if path is None else str(path)
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{shown_path(self.path)}: {self.reason}" if self.path else self.reason


def shown_path(path: str | Path) -> str:
    """``path`` for a one-line message, a control character in it written as its escape.

    A file name may hold a newline: printed as it is, the one-line error became two lines and
    named no file exactly.
    """
    text = str(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ImageReadError(FacecloakError):
    """An input file could not be read as an image (missing, truncated, hostile, unsupported)."""


class ImageWriteError(FacecloakError):
    """An output could not be written (would overwrite an input, disk error, bad format)."""


class ModelNotFoundError(FacecloakError):
    """A face model is unknown, or its weights are not available on this machine."""


class UnknownModelError(ModelNotFoundError):
    """No face model of that name is registered: the user mistyped it (a usage error)."""

    exit_code = EXIT_USAGE


class InvalidInputError(FacecloakError):
    """A tensor or option given to the Python API is malformed."""

    exit_code = EXIT_USAGE


class DonorBankError(FacecloakError):
    """A donor bank is missing, empty, damaged, or was built with other face models."""


class OutOfMemoryError(FacecloakError):
    """A photo did not fit in memory even alone (its chunk was split until it stood alone)."""
