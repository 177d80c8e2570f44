"""The journal of a batch: what was done in an output folder, so a killed batch resumes.

A batch writing into ``OUT`` appends one JSON line per event to ``OUT/.facecloak-journal.jsonl``:
``start`` before an output is written, ``done`` after it was renamed into place (with the
input's SHA-256, the settings fingerprint, the output's size and the per-face report). Each line
is flushed and fsync'd before the batch goes on, and outputs are written atomically (temporary
file, fsync, rename), so after a crash or ``kill -9``:

- a final output name never holds a partial file;
- a photo counts as done only with a ``done`` line whose input hash and settings match the
  present ones and whose output is still there with the recorded size; everything else is
  redone (a photo interrupted between its rename and its ``done`` line is computed again and
  its output replaced: done exactly once, computed at least once);
- a changed input (other hash) or changed settings (other fingerprint) is redone;
- a torn last line (the crash hit mid-append) is cut off on the next open, and temporary files
  of interrupted writes (``.facecloak-*``) are removed.

One batch at a time may use a folder: the journal is locked (``flock``) while open.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from facecloak import __version__
from facecloak.errors import FacecloakError

JOURNAL_NAME = ".facecloak-journal.jsonl"
TEMPORARY_PREFIX = ".facecloak-"  # io's atomic writes use this prefix for their temporary files

_JOURNAL_FLAGS = (
    os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
"""How the journal is opened: never through a symbolic link. A link planted under the journal's
name sent its lines into the file it named, outside the output folder, and cut that file's last
line off as a torn one."""

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def settings_fingerprint(settings: dict) -> str:
    """Short stable hash of the settings that shape an output (canonical JSON, with the code's revision)."""
    canonical = json.dumps(
        {"facecloak": __version__, "code": code_revision(), **settings}, sort_keys=True, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@functools.cache
def code_revision() -> str:
    """A short hash of facecloak's own Python files: the code that made an output.

    The version number alone named no change: it stayed 0.1.0 through hundreds of commits, and a
    resumed batch kept what an older facecloak had written (pixelated faces its successor made
    coarser because they were still recognised) as done and protected. Any change to the code
    redoes a batch's photos once: a resume never mixes outputs of two revisions.
    """
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def source_key(path: str | Path) -> str:
    """A short hash of where an input really is (symlinks resolved): which photo a record is about.

    Two photos of one name in two folders (``day1/IMG_0001.jpg``, ``day2/IMG_0001.jpg``) have one
    output name in a folder both batches write into; the journal told them apart only by their
    hashes, so the second batch took the first one's output for that of a changed photo and
    replaced it. Hashed, so the journal in an output folder does not spell out the user's folders.
    """
    if "://" in str(path):  # a URI (Ray's inputs): where it is, as given
        return hashlib.sha256(str(path).encode()).hexdigest()[:16]
    # os.fsencode: a name that is not UTF-8 (a Latin-1 camera card's) is bytes Python holds
    # as surrogates, which ``.encode()`` refused: the whole batch stopped with a traceback
    return hashlib.sha256(os.fsencode(Path(path).resolve())).hexdigest()[:16]


class JournalError(FacecloakError):
    """The journal cannot be used (locked by another batch, unwritable)."""


class Journal:
    """Append-only record of a batch's work in its output folder; see the module docstring.

    Args:
        out_dir: the batch's output folder (the journal lives in it).
        settings: what shapes the outputs (method and parameters, format, quality...); its
            fingerprint is stored with every line.

    Example:
        >>> with Journal(Path("out"), {"method": "blur"}) as journal:  # doctest: +SKIP
        ...     if journal.done_record("a.jpg", sha) is None:
        ...         journal.record("start", "a.jpg", sha, "a_anonymized.jpg")
    """

    def __init__(self, out_dir: str | Path, settings: dict) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / JOURNAL_NAME
        self.settings = settings
        self.fingerprint = settings_fingerprint(settings)
        self._last: dict[str, dict] = {}  # input -> its last record
        # (input, settings) -> its last record under those settings: runs of other commands into
        # the same folder (a blur, then a pixelation) no longer undo each other's "done"
        self._last_by_settings: dict[tuple[str, str | None], dict] = {}
        self._owned: dict[str, dict] = {}  # output -> the last record naming it (ours to replace)
        self._meta: list[dict] = []  # lines that are not about an input (settings)
        self._stream = None

    def __enter__(self) -> Journal:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Lock the folder, read what was done, cut a torn tail, remove interrupted temporary files.

        Raises:
            JournalError: one line (the output folder cannot be made, the journal cannot be
                opened or written, another batch holds it); nothing stays open or locked.
        """
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise JournalError(f"cannot create the output folder ({error.strerror})", self.out_dir) from None
        try:
            # held open (and locked) until close(); unbuffered, so a failed append leaves nothing
            # behind in a buffer for a later flush to write as a torn line
            self._stream = os.fdopen(os.open(self.path, _JOURNAL_FLAGS, 0o666), "a+b", buffering=0)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise JournalError("the journal is a symbolic link: not followed", self.path) from None
            raise JournalError(f"cannot open the journal ({error.strerror})", self.path) from None
        if not stat.S_ISREG(os.fstat(self._stream.fileno()).st_mode):  # a FIFO said "Illegal seek"
            self.close()
            raise JournalError("the journal is not a regular file", self.path)
        if fcntl is not None:
            try:
                fcntl.flock(self._stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.close()
                busy = "another facecloak batch is writing into this folder"
                raise JournalError(busy, self.out_dir) from None
        try:
            self._load()
            self._remove_temporary_files()
            known = {record.get("fingerprint") for record in self._meta if record.get("event") == "settings"}
            if self.fingerprint not in known:
                settings = {"event": "settings", "fingerprint": self.fingerprint, "settings": self.settings}
                self._append(settings)
        except OSError as error:  # a full disk or a read-only folder: one line, not a traceback
            self.close()
            raise JournalError(f"cannot write the journal ({error.strerror})", self.path) from None
        except JournalError:
            self.close()
            raise

    def close(self) -> None:
        """Release the lock."""
        if self._stream is not None:
            self._stream.close()  # closing the descriptor releases the flock
            self._stream = None

    def _load(self) -> None:
        self._stream.seek(0)
        data = self._stream.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a crash mid-append left a torn line: cut it off
            self._stream.truncate(end)
            os.fsync(self._stream.fileno())
            data = data[:end]
        for record in _intact_records(data):
            if "input" in record:
                self._last[record["input"]] = record
                self._last_by_settings[record["input"], record.get("settings")] = record
                if record.get("output"):
                    self._owned[record["output"]] = record
            else:
                self._meta.append(record)

    def _remove_temporary_files(self) -> None:
        """Temporary files of writes a crash interrupted (never renamed into place): ours, remove them.

        A folder below with a journal of its own is another batch's output folder (``-o out/b``
        beside ``-o out``): its temporary files may be that batch's writes in progress, and
        removing them failed its photos. Its own next run cleans them up.
        """
        for folder, subfolders, files in os.walk(self.out_dir):
            subfolders[:] = [name for name in subfolders if not (Path(folder, name) / JOURNAL_NAME).exists()]
            for name in files:
                if name.startswith(TEMPORARY_PREFIX) and name != JOURNAL_NAME:
                    _remove_if_left_over(Path(folder, name))

    def done_record(self, relative: str, sha256: str) -> dict | None:
        """The ``done`` record of ``relative`` if it still holds (same input, settings, output intact)."""
        record = self._last_by_settings.get((relative, self.fingerprint))
        if record is None or record.get("event") != "done":
            return None
        if self._owned.get(record["output"]) is not record:  # written again since, by other settings
            return None
        if record.get("sha256") != sha256:  # the settings are the key it was found under
            return None
        output = self.out_dir / record["output"]
        try:
            return record if output.stat().st_size == record.get("output_bytes") else None
        except (OSError, ValueError):  # gone, or a name no file can have (a NUL)
            return None

    def last_record(self, relative: str) -> dict | None:
        """The latest line about input ``relative``, if any."""
        return self._last.get(relative)

    def made_from_another(self, relative_output: str, source: str | Path | None) -> str | None:
        """The input (relative name) whose output ``relative_output`` is, if not photo ``source``.

        Another photo is another place (`source_key`) and other bytes. A record of an older
        facecloak, without a place, is told by its bytes alone; a URI's bytes are not at hand here,
        so another URI is another photo. None: this photo's, nobody's, or ``source`` not given.
        """
        record = self._owned.get(relative_output)
        if record is None or source is None or record.get("source") == source_key(source):
            return None
        if "://" in str(source):
            return record["input"]
        try:
            same = file_sha256(source) == record.get("sha256")
        except OSError:  # unreadable: its read fails with the reason, not a skip that hides it
            return None
        return None if same else record["input"]

    def owns(self, relative_output: str, source: str | Path | None = None) -> bool:
        """Whether the output is ours to replace: a record names it and nobody changed it since.

        A file finished (``done``) at one size and found at another was edited or replaced by
        someone else after we wrote it (our writes are atomic, so never torn): it is theirs now,
        skipped like any file the journal does not know, unless ``--overwrite``. With ``source``
        (the input about to be written there), an output made from another photo (another place
        and other bytes: `source_key`) is not this input's to replace either; a folder moved
        with its photos unchanged still is.
        """
        record = self._owned.get(relative_output)
        if record is None or self.made_from_another(relative_output, source) is not None:
            return False
        if record.get("event") != "done" or "output_bytes" not in record:
            return True
        try:
            return (self.out_dir / relative_output).stat().st_size == record["output_bytes"]
        except (OSError, ValueError):  # gone: nothing of anyone's to lose
            return True

    def record(self, event: str, relative: str, sha256: str, output: str, **extra) -> dict:
        """Append one durable line (written, flushed, fsync'd before returning)."""
        record = {
            "event": event,
            "input": relative,
            "sha256": sha256,
            "settings": self.fingerprint,
            "output": output,
            "time": round(time.time(), 3),
            **extra,
        }
        self._append(record)
        self._last[relative] = record
        self._last_by_settings[relative, record.get("settings")] = record
        self._owned[output] = record
        return record

    def _append(self, record: dict) -> None:
        """Write one line durably, or cut back what got written of it and raise `JournalError`.

        A full disk can take part of a line: left there, the next append would run into it and
        both lines would be lost to the next run's reading.
        """
        if self._stream is None:
            raise JournalError("the journal is not open", self.path)
        descriptor = self._stream.fileno()
        line = memoryview((json.dumps(record, separators=(",", ":")) + "\n").encode())
        end = os.lseek(descriptor, 0, os.SEEK_END)
        try:
            while line:
                line = line[os.write(descriptor, line) :]
            os.fsync(descriptor)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, end)
            raise JournalError(f"cannot write the journal ({error.strerror})", self.path) from None


def _intact(record) -> bool:
    """Whether a parsed journal line has the shape this module writes (a damaged one may not)."""
    if not isinstance(record, dict):
        return False
    if "input" not in record:
        return True
    output = record.get("output")
    return isinstance(record["input"], str) and isinstance(output, str) and _inside_folder(output)


def _inside_folder(output: str) -> bool:
    """Whether an output name stays inside the journal's folder, the only place a batch writes.

    A journal edited or planted by someone else that named ``/elsewhere/photo.jpg`` or
    ``../photo.jpg`` made a batch take that file for a photo's finished output (the photo was
    reported protected and never written) and a folder walk skip a photo as an earlier output.
    """
    parts = PurePosixPath(output).parts
    return not output.startswith(("/", "\\")) and ".." not in parts and "\0" not in output


def read_journal(out_dir: str | Path) -> list[dict]:
    """Every intact line of a folder's journal, in order (for reports and tests)."""
    path = Path(out_dir) / JOURNAL_NAME
    return list(_intact_records(path.read_bytes())) if path.exists() else []


def _intact_records(data: bytes) -> Iterator[dict]:
    """The records of a journal's bytes: lines that parse and have this module's shape (`_intact`)."""
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if _intact(record):  # a damaged line that still parses (``1``, ``[]``): not ours
            yield record


def _remove_if_left_over(path: Path) -> None:
    """Remove a temporary file a crashed write left, never one a live run is writing.

    Its writer locks it until the rename (`facecloak.io.write.write_bytes_atomic`): without that
    test, a run beside this one (writing beside its inputs, in a folder below ``-o``) lost the file
    it was writing and failed the photo.
    """
    if fcntl is None:  # no flock (Windows): by its name alone, as before
        path.unlink(missing_ok=True)
        return
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # renamed into place meanwhile, or not ours to read
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # being written
        return
    else:
        path.unlink(missing_ok=True)
    finally:
        os.close(descriptor)
