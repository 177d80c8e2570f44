"""Which files a run reads and writes: image suffixes, walking folders, output names and formats."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from facecloak.errors import ImageWriteError
from facecloak.io.read import HEIF_AVAILABLE
from facecloak.journal import JOURNAL_NAME, TEMPORARY_PREFIX, read_journal

IMAGE_SUFFIXES = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
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

INSIDE_THE_OUTPUT_FOLDER = "inside the output folder: not read (give it on its own, or another -o)"
"""Why a photo under the output folder is passed over: it may be an earlier run's output."""

NAME_MAX = 255
"""The most bytes a file name can have on the usual file systems (ext4, XFS, APFS, NTFS)."""

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


def output_suffix(source_format: str, requested: str | None = None) -> str:
    """The file suffix for an output: the requested format, else the source's (GIF -> PNG)."""
    name = (requested or source_format).upper()
    if requested and name == "GIF":  # GIF -> PNG is for inputs; asked for, it was written as PNG unsaid
        raise ImageWriteError("cannot write GIF (its palette would quantise a cloak away): ask for png")
    name = {"JPG": "JPEG", "TIF": "TIFF", "HEIC": "HEIF", "GIF": "PNG", "MPO": "JPEG"}.get(name, name)
    if name == "HEIF" and not HEIF_AVAILABLE:
        if requested:  # asked for, it was written as JPEG without a word
            raise ImageWriteError("writing HEIF needs pillow-heif: pip install 'facecloak[heic]'")
        name = "JPEG"
    if name not in OUTPUT_FORMATS:
        raise ImageWriteError(f"unsupported output format {requested or source_format!r}")
    return OUTPUT_FORMATS[name]


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (hard links and symlinks included)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def file_identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of the file ``path`` names (symlinks followed), or None if there is none."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


class ProtectedFiles:
    """Files that must never be replaced (a batch's inputs), matched as `same_file` matches.

    By device and inode, so hard links and symlinks count. The inputs are looked at once; each
    question is then one ``stat`` of the path asked about, however many inputs the batch has
    (a comparison with every input per output made a batch quadratic in its size).
    """

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self._identities = {found for path in paths if (found := file_identity(Path(path))) is not None}

    def __contains__(self, path: object) -> bool:
        found = file_identity(Path(path)) if isinstance(path, (str, Path)) else None
        return found is not None and found in self._identities

    def __len__(self) -> int:
        return len(self._identities)


@dataclass(frozen=True)
class ImageJob:
    """One input photo and where its output goes, relative to the output folder."""

    path: Path
    relative: Path  # mirrors the input tree under the output folder
    named: bool = False  # given by name, not found in a folder: always an input


def collect_images(
    paths: Sequence[str | Path], *, exclude: Path | None = None
) -> tuple[list[ImageJob], list[tuple[Path, str]]]:
    """Expand files and folders (recursively, sorted) into image jobs.

    Files named explicitly are always tried (a bad one fails with a reason later), once however
    often they are named, and stay named when a folder given before holds them too; inside
    folders only files with an image suffix are taken and the rest are returned as skipped, with
    a note, as is a second path to a photo already taken (a symlink to it): one input, never
    silently dropped. Hidden files and folders (a name starting with a dot) are not read, but a
    photo among them is listed as skipped, and so is a link to a photo that is gone.
    ``exclude`` (the output folder) is never walked when it lies inside a folder given, so
    outputs are not re-read as inputs (a batch also passes over files that are the outputs of
    other inputs, see `facecloak.batch.plan_batch`).
    """
    jobs: list[ImageJob] = []
    skipped: list[tuple[Path, str]] = []
    excluded = exclude.resolve() if exclude is not None and exclude.exists() else None
    seen: dict[Path, int] = {}  # each file (symlinks resolved) -> its job's index
    for given in map(Path, paths):
        if given.is_file():
            first = seen.get(given.resolve())
            if first is None:
                seen[given.resolve()] = len(jobs)
                jobs.append(ImageJob(given, Path(given.name), named=True))
            elif not jobs[first].named:  # found in a folder given before: named, so an input
                jobs[first] = ImageJob(jobs[first].path, jobs[first].relative, named=True)
            elif not _same_path(jobs[first].path, given):  # the same file named twice is one input
                skipped.append((given, f"the same file as {jobs[first].path}"))
            continue
        if given.is_dir():
            # only an output folder inside this one: ``photos -o .`` from inside photos/, whose
            # output folder holds it, read none of its photos ("inside the output folder")
            skip = excluded if excluded is not None and given.resolve() in excluded.parents else None
            mirrored = _folder_name(given) if len(paths) > 1 else Path()
            # rglob does not go into a symlink to a folder: said, so its photos are not silently left
            # (and a link whose target is gone is listed with the files: said, not dropped)
            # (and a pipe, socket or device is listed too: it was dropped without a word)
            found = sorted(p for p in given.rglob("*") if p.is_symlink() or not p.is_dir())
            # outputs of -o runs into folders under this one, from the journals this walk passes
            earlier = _journaled_outputs(file for file in found if file.name == JOURNAL_NAME)
            for file in found:
                relative = file.relative_to(given)
                if any(part.startswith(".") for part in relative.parts):
                    # hidden: not read, but a photo there is named (a face in it would go unprotected)
                    if file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith(TEMPORARY_PREFIX):
                        skipped.append(
                            (file, "hidden (a name starting with a dot): not read (give it itself)")
                        )
                    continue
                resolved = file.resolve()  # once: a stat per link along the path, for every file
                if resolved in earlier:  # never re-read as a photo, wherever this run writes
                    if skip is None or skip not in resolved.parents:
                        journal = earlier[resolved]
                        why = f"an output of an earlier run, not read again (its journal: {journal}; "
                        skipped.append((file, why + "give the file itself to read it)"))
                    continue
                if skip is not None and skip in resolved.parents:
                    # a photo there is named, never dropped silently (it would go unprotected)
                    if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                        skipped.append((file, INSIDE_THE_OUTPUT_FOLDER))
                    continue
                if file.is_dir():
                    skipped.append((file, "a link to a folder, not followed (give the folder itself)"))
                elif not file.exists() and file.suffix.lower() in IMAGE_SUFFIXES:
                    skipped.append((file, "a broken link: its target is missing"))
                elif file.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append((file, "not an image suffix"))
                elif not file.is_file():
                    skipped.append((file, "not a regular file (a pipe, socket or device): not read"))
                elif resolved in seen:  # a photo already taken (a symlink to it): one input, named
                    first = jobs[seen[resolved]].path
                    if not _same_path(first, file):
                        skipped.append((file, f"the same file as {first}"))
                else:
                    seen[resolved] = len(jobs)
                    jobs.append(ImageJob(file, mirrored / relative))
        else:
            jobs.append(ImageJob(given, Path(given.name), named=True))  # missing: fails with its reason
    return jobs, skipped


def _journaled_outputs(journals: Iterable[Path]) -> dict[Path, Path]:
    """The files these facecloak ``journals`` name as outputs (resolved), each with its journal.

    An output folder inside the photos (``-o photos/out``) is left out of that run's walk, but a
    later run without -o, or with another -o, walked into it and took its outputs for photos.
    """
    outputs: dict[Path, Path] = {}
    for journal in journals:
        try:
            records = read_journal(journal.parent)
        except OSError:
            continue
        for record in records:
            if record.get("output"):
                outputs[(journal.parent / record["output"]).resolve()] = journal
    return outputs


def _same_path(a: Path, b: Path) -> bool:
    """Whether two paths are spelt alike once made absolute (``./a.jpg`` is ``a.jpg``; a symlink is not)."""
    return os.path.abspath(a) == os.path.abspath(b)


def _folder_name(folder: Path) -> Path:
    """The name a folder given among several is mirrored under: its own, as the absolute path says.

    ``Path("..").name`` is ``..``, which put the outputs of ``cloak .. other/ -o out`` beside
    the inputs, outside ``out``; ``Path(".").name`` is empty, which put ``.``'s outputs loose in
    ``out`` beside the other folders'. The absolute path's last part is the folder's real name
    (symlinks are not resolved: a linked folder keeps the name it was given under).
    """
    return Path(Path(os.path.abspath(folder)).name)


def output_path(
    job: ImageJob, out_dir: Path | None, tag: str, format_name: str | None, source_format: str
) -> Path:
    """Where the output of ``job`` goes: ``<stem>_<tag><suffix>``, mirrored under ``out_dir``.

    Without ``out_dir`` the output sits beside the input. The tag guarantees that an output never
    has an input's name, even when both live in the same folder.
    """
    try:
        suffix = output_suffix(source_format, format_name)
    except ImageWriteError as error:  # the batch's line names the photo, and the way out
        raise ImageWriteError(f"{error.reason} (--format png writes it)", job.path) from None
    name = f"{job.path.stem}_{tag}{suffix}"
    if len(os.fsencode(name)) > NAME_MAX:  # a 255-byte input name: its output's is longer
        raise ImageWriteError(
            f"its output name {name[:40]}... would be {len(os.fsencode(name))} bytes, more than the "
            f"{NAME_MAX} a file name can have (rename the photo)",
            job.path,
        )
    if out_dir is None:
        return job.path.with_name(name)
    return out_dir / job.relative.with_name(name)
