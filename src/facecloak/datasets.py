"""Labelled face folders for evaluation: one sub-folder per person (ImageFolder style), LFW pairs.

Only file lists and labels live here; pixels are read by `facecloak.io` when needed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from facecloak._checks import is_whole_number
from facecloak.errors import InvalidInputError
from facecloak.io import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Person:
    """A person's photos, in sorted file order (LFW: ``_0001``, ``_0002``, ...)."""

    name: str
    photos: tuple[Path, ...]


def list_people(root: str | Path) -> list[Person]:
    """Every sub-folder of ``root`` holding images, as a `Person`, sorted by name.

    Hidden folders and files (a name starting with "."), as a folder walk skips them, are left
    out: a copy from a Mac holds ``._<photo>.jpg`` files that are not photos, and they would sort
    first and become a person's probes.

    Raises:
        InvalidInputError: ``root`` is missing, not a folder, or holds no person folder.
    """
    root = Path(root)
    if not root.exists():
        raise InvalidInputError("no such folder (give a folder of people, one sub-folder per person)", root)
    if not root.is_dir():
        raise InvalidInputError("not a folder of people (one sub-folder per person)", root)
    people = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = tuple(
            sorted(
                p
                for p in folder.iterdir()
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
            )
        )
        if photos:
            people.append(Person(folder.name, photos))
    if not people:
        raise InvalidInputError("no person folders with images found", root)
    return people


@dataclass(frozen=True)
class Split:
    """Who is protected, who is the unprotected control, and everyone else (distractors).

    Each protected and control person's first ``probes`` photos are the clean probes; their other
    photos go into the scraper's gallery (protected ones after protection).
    """

    protected: tuple[Person, ...]
    control: tuple[Person, ...]
    distractors: tuple[Person, ...]
    probes: int

    def probe_photos(self, person: Person) -> tuple[Path, ...]:
        """The held-out clean photos of ``person``."""
        return person.photos[: self.probes]

    def gallery_photos(self, person: Person) -> tuple[Path, ...]:
        """The photos of ``person`` the scraper collects."""
        return person.photos[self.probes :]


def split_people(
    people: list[Person],
    *,
    protected: int | Sequence[str] = 20,
    control: int = 20,
    min_photos: int = 10,
    probes: int = 2,
    seed: int = 0,
) -> Split:
    """Choose protected and control people among those with at least ``min_photos`` photos.

    Args:
        people: from `list_people`.
        protected: how many to protect (drawn with ``seed``), or their names.
        control: how many unprotected people to use as the control group.
        min_photos: only people with at least this many photos are eligible.
        probes: photos per person held out as clean probes.
        seed: random seed of the draw.
    """
    # -1 protected all but one eligible person (a slice's end), without a word; a tuple of names,
    # or a float, failed with a TypeError traceback
    if isinstance(protected, Sequence) and not isinstance(protected, str):
        protected = list(protected)
    elif not is_whole_number(protected) or protected < 1:
        raise InvalidInputError(
            f"protected must be a number of people from 1, or their names; got {protected!r}"
        )
    if not is_whole_number(control) or control < 0:
        raise InvalidInputError(f"control must be a number of people from 0; got {control!r}")
    if not (is_whole_number(probes) and is_whole_number(min_photos)) or probes < 1 or min_photos <= probes:
        raise InvalidInputError("need probes >= 1 and min_photos > probes, both whole numbers")
    eligible = [p for p in people if len(p.photos) >= min_photos]
    rng = random.Random(seed)
    if isinstance(protected, list):
        by_name = {p.name: p for p in people}
        missing = [name for name in protected if name not in by_name]
        if missing:
            raise InvalidInputError(f"unknown people: {', '.join(missing)}")
        twice = sorted({name for name in protected if protected.count(name) > 1})
        if twice:
            raise InvalidInputError(f"people named twice: {', '.join(twice)}")
        chosen = [by_name[name] for name in protected]
        # named people may have fewer than min_photos (a narrowed folder), but one with no photo
        # left for the gallery would count as protected whatever the protection does
        few = [f"{p.name} ({len(p.photos)})" for p in chosen if len(p.photos) <= probes]
        if few:
            raise InvalidInputError(f"people with no photo beside their {probes} probe(s): {', '.join(few)}")
        others = [p for p in eligible if p.name not in set(protected)]
    else:
        if protected + control > len(eligible):
            raise InvalidInputError(
                f"only {len(eligible)} people have >= {min_photos} photos; asked for {protected} + {control}"
            )
        shuffled = eligible[:]
        rng.shuffle(shuffled)
        chosen, others = shuffled[:protected], shuffled[protected:]
    rng.shuffle(others)
    control_people = others[:control]
    taken = {p.name for p in chosen} | {p.name for p in control_people}
    distractors = [p for p in people if p.name not in taken]
    return Split(tuple(chosen), tuple(control_people), tuple(distractors), probes)


@dataclass(frozen=True)
class Pair:
    """One LFW verification pair."""

    first: Path
    second: Path
    same: bool
    fold: int


def read_lfw_pairs(pairs_file: str | Path, images: str | Path | None = None) -> list[Pair]:
    """Parse LFW's ``pairs.txt`` (View 2 format) into `Pair`s with image paths.

    The first line is ``<folds> <pairs per class>``; each fold lists that many matched pairs
    (``name i j``) then that many mismatched pairs (``name1 i name2 j``).

    Raises:
        InvalidInputError: one line naming ``pairs_file`` (and the line, where one is at fault):
            the file cannot be read, its counts do not add up, a pair is malformed, or it names a
            photo missing under ``images`` (that failed only when the photo was embedded, after
            every photo before it).
    """
    pairs_file = Path(pairs_file)
    images = Path(images) if images else pairs_file.parent / "images"
    try:
        lines = pairs_file.read_text(encoding="utf-8-sig").split("\n")  # a BOM: Windows editors
    except UnicodeDecodeError:
        raise InvalidInputError("not a text file of LFW pairs", pairs_file) from None
    except OSError as error:  # it was a FileNotFoundError traceback
        raise InvalidInputError(
            f"cannot read the pairs file ({error.strerror or error})", pairs_file
        ) from None
    try:
        folds, per_class = (int(v) for v in lines[0].split())
    except ValueError:
        raise InvalidInputError("first line must be '<folds> <pairs per class>'", pairs_file) from None
    if folds < 1 or per_class < 1:  # 0 folds gave no pairs, and no error
        raise InvalidInputError("first line must be '<folds> <pairs per class>', both at least 1", pairs_file)

    def photo(name: str, number: str, line: int) -> Path:
        if not number.isdecimal() or int(number) < 1:  # it was a ValueError traceback
            raise InvalidInputError(
                f"line {line}: photo number {number!r} is not a whole number from 1", pairs_file
            )
        path = images / name / f"{name}_{int(number):04d}.jpg"
        if not path.is_file():
            raise InvalidInputError(f"line {line}: no photo {path}", pairs_file)
        return path

    pairs = []
    # numbered as in the file: blank lines between the pairs are skipped, and an error named the
    # line counted without them
    rows = [(number, line.split()) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    if len(rows) != folds * per_class * 2:
        raise InvalidInputError(f"expected {folds * per_class * 2} pairs, found {len(rows)}", pairs_file)
    for index, (line, row) in enumerate(rows):
        fold = index // (2 * per_class)
        if len(row) == 3:
            pairs.append(Pair(photo(row[0], row[1], line), photo(row[0], row[2], line), True, fold))
        elif len(row) == 4:
            pairs.append(Pair(photo(row[0], row[1], line), photo(row[2], row[3], line), False, fold))
        else:
            raise InvalidInputError(
                f"malformed pair on line {line} (expected 'name i j' or 'name1 i name2 j')", pairs_file
            )
    return pairs
