"""Donor banks: the faces that new faces are made from (`facecloak.replace`), kept as a plain folder.

A bank is a folder under ``$XDG_DATA_HOME/facecloak/donors/<name>`` (default
``~/.local/share/facecloak/donors``), copyable and inspectable:

    bank.json        manifest: format, models and their fingerprints, one record per donor (source
                     photo, box, landmarks, pose, colour statistics, the user's licence note)
    chips/<id>.png   each donor's canonical chip (`facecloak.synthesis`: 256 px, landmarks on
                     `CANONICAL_TEMPLATE`), what faces are synthesised from
    chips/<id>@2x.jpg  the same face at twice the resolution, for donors whose photo holds that
                     much (`DETAIL_FROM`): large new faces read their pixels from it (JPEG 95:
                     only pixels are read from it, never an embedding)
    embeddings.npz   each recogniser's embedding of every chip (rows named by ``ids``)

Every embedding is computed from the stored chip, so a bank can be re-embedded from its own files
(`refresh_bank`) when recognisers are added, without its source photos. Writes are atomic: chips
first, then the embeddings, then the manifest (``os.replace``), so a bank is never half-written.

Donor photos are the user's (their own stock photos, a licensed or a synthetic face set):
facecloak ships none and downloads none.
"""

from __future__ import annotations

import datetime as _datetime
import io as io_bytes
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facecloak import io
from facecloak.detect import FaceDetector
from facecloak.donor_bank import (
    BANK_FILES,
    BANK_FORMAT,
    DEFAULT_BANK,
    DONOR_MAX_OUTSIDE,
    DONOR_MAX_YAW,
    DONOR_MIN_FACE_PX,
    DONOR_MIN_SCORE,
    DonorBank,
    bank_folder,
    load_bank,
    model_fingerprint,
)
from facecloak.embed import embed_faces
from facecloak.errors import DonorBankError, FacecloakError, ImageReadError, ImageWriteError
from facecloak.faces import Faces
from facecloak.journal import file_sha256
from facecloak.models.registry import Embedder
from facecloak.synthesis import (
    CHIP_SIZE_PX,
    DETAIL_SCALE,
    FACE_STATISTICS,
    canonical_chips,
    estimate_pose,
    eye_distance,
    face_statistics,
    reads_detail_chips,
    window_outside_share,
)

EMBED_BLOCK = 64
"""Donor chips embedded and written at a time while a folder is added: a bank of ten thousand
donors is added with the memory of 64 chips, not of all of them (0.8 MB each as floats)."""

DETAIL_CHIP_QUALITY = 95
"""JPEG quality of detail chips: a quarter of a PNG's size, and nothing is measured on them."""


@dataclass
class AddReport:
    """What ``add_donors`` did: donors added, photos skipped (no usable face) or failed, with reasons."""

    bank: str
    folder: str
    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    total_donors: int = 0
    passed_over: list[tuple[str, str]] = field(default_factory=list)
    """Files of the folders given that were not read: not a photo's suffix, a link to a folder
    (not followed), a second path to a photo. Listed, as a batch lists them, never dropped silently."""
    written: bool = False
    """Whether the bank exists after the add: a bank emptied by `remove_donors` that took no donor
    was said not to have been created."""

    def __str__(self) -> str:
        lines = [
            f"bank {self.bank}: {len(self.added)} donor(s) added, {self.total_donors} in all ({self.folder})"
            if self.written
            else f"bank {self.bank}: no donor added, so no bank was created ({self.folder})"
        ]
        if self.skipped:
            lines.append(f"  {len(self.skipped)} photo(s) skipped (no usable face, or in the bank already):")
            lines += [f"    {path}: {reason}" for path, reason in self.skipped]
        if self.passed_over:
            lines.append(f"  {len(self.passed_over)} file(s) passed over:")
            lines += [f"    {path}: {reason}" for path, reason in self.passed_over]
        if self.failed:
            lines.append(f"  {len(self.failed)} file(s) failed:")
            lines += [f"    error: {reason}" for _, reason in self.failed]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            "bank": self.bank,
            "folder": self.folder,
            "added": self.added,
            "total_donors": self.total_donors,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "failed": [{"path": p, "error": r} for p, r in self.failed],
            "passed_over": [{"path": p, "reason": r} for p, r in self.passed_over],
        }


def add_donors(
    paths: Sequence[str | Path],
    models: Sequence[Embedder],
    *,
    bank: str | Path = DEFAULT_BANK,
    licence: str = "",
    detector: FaceDetector | None = None,
    all_faces: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> AddReport:
    """Detect, align and store the donor faces of photos under ``paths`` into ``bank``.

    Each photo gives its largest face (or, with ``all_faces``, every face) that is at least
    `DONOR_MIN_FACE_PX`, confident and not in profile. A photo without one is listed in the report
    and skipped; an unreadable file is listed as failed; the others are still added.

    Args:
        paths: photos and folders (walked recursively).
        models: every recogniser new faces will be checked with (their embeddings are stored).
        bank: bank name or folder; created if missing.
        licence: the user's note on where the photos come from and under which licence.
        detector: face detector (default MTCNN on the models' device).
        all_faces: take every usable face of a photo, not only the largest.
        on_progress: called with (photos done, photos total).

    Raises:
        DonorBankError: no model given, or an existing bank built with other models.
        ImageWriteError: a file of the bank could not be written (the message names it).
    """
    if not models:
        raise DonorBankError("no face model is available to embed donors; see `facecloak models`")
    folder = bank_folder(bank)
    if folder.is_dir() and not (folder / "bank.json").is_file() and any(folder.iterdir()):
        # `--bank photos/` wrote the bank among the user's photos, and `donors remove` then
        # deleted the folder with them
        raise DonorBankError(
            "holds files and no bank: a bank is made in a new or empty folder (give --bank a new name)",
            folder.resolve(),
        )
    with bank_lock(folder):
        return _add_donors(paths, models, folder, licence, detector, all_faces, on_progress)


def _add_donors(
    paths: Sequence[str | Path],
    models: Sequence[Embedder],
    folder: Path,
    licence: str,
    detector: FaceDetector | None,
    all_faces: bool,
    on_progress: Callable[[int, int], None] | None,
) -> AddReport:
    """`add_donors` once the bank's lock is held."""
    existing = load_bank(folder, allow_empty=True) if (folder / "bank.json").is_file() else None
    if existing is not None:
        existing.check_models(models)
    detector = detector or FaceDetector()
    jobs, passed_over = io.collect_images(paths, exclude=folder)  # not its own chips, if below
    report = AddReport(bank=folder.name, folder=str(folder))
    report.passed_over = [(str(path), reason) for path, reason in passed_over]
    records: list[dict] = []
    pending: list[Tensor] = []  # chips not yet embedded and written: at most EMBED_BLOCK
    embedded: dict[str, list[np.ndarray]] = {model.card.name: [] for model in models}
    next_id = _next_id(existing)
    # a photo added before is not added again (the same folder given twice doubled the bank)
    before = existing.donors if existing is not None else []
    known = {record["source"]: record["id"] for record in before}
    # nor is a copy of one under another name (its face would be two donors of one identity)
    known_bytes = {record["sha256"]: record["id"] for record in before if "sha256" in record}

    def flush() -> None:
        """Embed the pending chips and write them: memory stays bounded however large the folder."""
        if not pending:
            return
        for name, table in embed_donor_chips(torch.stack(pending), models, detector).items():
            embedded[name].append(table)
        _make_bank_folder(folder)
        for record, chip in zip(records[len(records) - len(pending) :], pending):
            io.write_image(folder / "chips" / f"{record['id']}.png", chip, overwrite=True)
        pending.clear()

    now = _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds")
    for done, job in enumerate(jobs):
        if str(job.path.resolve()) in known:
            report.skipped.append(
                (str(job.path), f"in the bank already (donor {known[str(job.path.resolve())]})")
            )
            continue
        try:
            image = io.read_image(job.path)
            digest = file_sha256(job.path)
        except OSError as error:  # read a moment ago: gone or unreadable since
            report.failed.append((str(job.path), str(ImageReadError(error.strerror or str(error), job.path))))
            continue
        except FacecloakError as error:
            report.failed.append((str(job.path), str(error)))
            continue
        if digest in known_bytes:
            report.skipped.append((str(job.path), f"the same photo as donor {known_bytes[digest]}"))
            continue
        with torch.no_grad():
            faces = detector([image.pixels])
        usable, reason = _usable_faces(faces, all_faces, *image.size)
        if not usable:
            report.skipped.append((str(job.path), reason))
            continue
        picked = faces.select(usable)
        face_chips, chip_points = canonical_chips(image.pixels[None], picked.landmarks, picked.image_index)
        face_chips = (face_chips * 255).round() / 255  # exactly what the PNG will hold
        poses = estimate_pose(picked.landmarks)
        stats = face_statistics(face_chips)
        detailed = [reads_detail_chips(float(eyes)) for eyes in eye_distance(picked.landmarks)]
        for k in range(len(picked)):
            donor_id = f"d{next_id:05d}"
            next_id += 1
            known_bytes.setdefault(digest, donor_id)
            if detailed[k]:  # written now (a large chip is not held for the whole folder)
                _write_detail_chip(folder, donor_id, image.pixels, picked.select([k]))
            records.append(
                {
                    "id": donor_id,
                    "source": str(job.path.resolve()),
                    "sha256": digest,
                    "box": [round(float(v), 2) for v in picked.boxes[k]],
                    "landmarks": [[round(float(v), 2) for v in point] for point in picked.landmarks[k]],
                    "score": round(float(picked.scores[k]), 4),
                    "photo_size": list(image.size),
                    "chip_landmarks": [[round(float(v), 3) for v in point] for point in chip_points[k]],
                    "pose": [round(float(v), 4) for v in poses[k]],
                    "stats": [round(float(v), 4) for v in stats[k]],
                    "licence": licence,
                    "added": now,
                    **({"detail_scale": DETAIL_SCALE} if detailed[k] else {}),
                }
            )
            pending.append(face_chips[k])
        if len(pending) >= EMBED_BLOCK:
            flush()
        if on_progress is not None:
            on_progress(done + 1, len(jobs))
    flush()
    embeddings = {name: np.concatenate(tables) for name, tables in embedded.items() if tables}
    source = {
        "folder": ", ".join(str(Path(p).resolve()) for p in paths),
        "licence": licence,
        "added": now,
        "photos": len(jobs),
        "donors": len(records),
        "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
    }
    if existing is None and not records:
        # no face to add: no bank is created (an empty one, under a mistyped name too, was left
        # behind to be refused later as empty by `anonymize --donors`)
        return report
    if existing is not None and not records:
        # nothing new (every photo in the bank already, or faceless): the bank stays as it was,
        # not rewritten with a source entry of 0 donors that `donors list` then showed
        report.total_donors = len(existing)
        report.written = True
        return report
    _commit(folder, existing, records, embeddings, models, source, next_id)
    report.added = [record["id"] for record in records]
    report.total_donors = (len(existing) if existing is not None else 0) + len(records)
    report.written = True
    return report


@contextmanager
def bank_lock(folder: Path) -> Iterator[Path | None]:
    """Hold the bank in ``folder`` for one writer at a time (an advisory lock beside the folder).

    Two `facecloak donors add` into one bank at once both numbered their donors from the same
    manifest, wrote chips of the same ids over each other's and each wrote its own manifest: the
    first to finish lost every donor it reported added, and a donor's chip could be another's.
    The lock file lies beside the bank (``.NAME.lock``), so no bank folder is made for it; it
    yields that file's path (None where there is no locking). A holder may delete the file (a
    removed bank leaves none behind): whoever waited on it then locks the new one instead.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unguarded, as before
        yield None
        return
    path = folder.parent / f".{folder.name}.lock"
    while True:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a")  # noqa: SIM115 - held for the whole block
        except OSError as error:  # a file where a folder should be said "File exists"
            in_the_way = isinstance(error, FileExistsError)
            reason = "a file is in the way of its folder" if in_the_way else error.strerror
            raise ImageWriteError(f"cannot lock the bank ({reason or error})", path) from None
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            current = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()  # the holder before removed the bank and its lock file: lock the new one
    with handle:
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_detail_chip(folder: Path, donor_id: str, pixels: Tensor, face: Faces) -> None:
    """Cut and write one donor's detail chip (`DETAIL_SCALE` x the chip's resolution)."""
    detail, _ = canonical_chips(pixels[None], face.landmarks, torch.zeros(1, dtype=torch.long), DETAIL_SCALE)
    _make_bank_folder(folder)
    path = folder / "chips" / f"{donor_id}@{DETAIL_SCALE}x.jpg"
    io.write_image(path, detail[0], overwrite=True, jpeg_quality=DETAIL_CHIP_QUALITY)


def _usable_faces(faces: Faces, all_faces: bool, width: int, height: int) -> tuple[list[int], str]:
    """Indices of the donor-worthy faces of one ``width`` x ``height`` photo, or none and the reason."""
    if len(faces) == 0:
        return [], "no face found"
    sides = torch.minimum(faces.boxes[:, 2] - faces.boxes[:, 0], faces.boxes[:, 3] - faces.boxes[:, 1])
    yaw = estimate_pose(faces.landmarks)[:, 0].abs()
    outside = window_outside_share(faces.landmarks, width, height)
    good = (
        (sides >= DONOR_MIN_FACE_PX)
        & (faces.scores >= DONOR_MIN_SCORE)
        & (yaw <= DONOR_MAX_YAW)
        & (outside <= DONOR_MAX_OUTSIDE)
    )
    if not bool(good.any()):
        largest = int(sides.argmax())
        if float(sides[largest]) < DONOR_MIN_FACE_PX:
            return (
                [],
                f"face too small to be a donor ({float(sides[largest]):.0f} px < {DONOR_MIN_FACE_PX} px)",
            )
        if float(yaw[largest]) > DONOR_MAX_YAW:
            return [], "face turned too far from the camera"
        if float(outside[largest]) > DONOR_MAX_OUTSIDE:
            return [], f"face cut off by the photo's edge ({float(outside[largest]):.0%} of it beyond)"
        return [], f"face not clear enough (detector confidence {float(faces.scores[largest]):.2f})"
    candidates = good.nonzero()[:, 0]
    if all_faces:
        return candidates.tolist(), ""
    return [int(candidates[sides[candidates].argmax()])], ""


def embed_donor_chips(
    chips: Tensor, models: Sequence[Embedder], detector: FaceDetector | None = None
) -> dict[str, np.ndarray]:
    """Each model's embedding of (N, 3, S, S) canonical chips, as a scraper would compute it.

    The face is detected in the chip itself (the one nearest its centre); where the detector
    finds nothing, the canonical box and landmarks stand in.
    """
    detector = detector or FaceDetector()
    with torch.no_grad():
        found = detector(list(chips))
    centre = torch.tensor([CHIP_SIZE_PX / 2, CHIP_SIZE_PX / 2])
    picked = []
    for i in range(len(chips)):
        mine = found.for_image(i, reindex=False)
        if len(mine):
            centres = (mine.boxes[:, :2] + mine.boxes[:, 2:]) / 2
            picked.append(mine.select([int((centres - centre).norm(dim=1).argmin())]))
        else:
            picked.append(_canonical_face(i))
    faces = Faces.cat(picked)
    images = list(chips)
    return {model.card.name: embed_faces(images, faces, model).cpu().numpy() for model in models}


def _canonical_face(index: int) -> Faces:
    """The face of a canonical chip where its template puts it (when detection misses it)."""
    from facecloak.synthesis import CANONICAL_TEMPLATE

    points = torch.tensor(CANONICAL_TEMPLATE)
    unit = float((points[1] - points[0]).norm())
    centre_x, centre_y = float(points[:, 0].mean()), float(points[:, 1].mean())
    box = torch.tensor(
        [[centre_x - 1.1 * unit, centre_y - 1.35 * unit, centre_x + 1.1 * unit, centre_y + 1.25 * unit]]
    )
    return Faces(box, points[None], torch.ones(1), torch.full((1,), index, dtype=torch.long))


def _photo_size(source: str) -> dict:
    """``{"photo_size": [w, h]}`` of a donor's source photo as read (EXIF rotation applied).

    ``{}`` where it can no longer be read: that donor stays unmeasured (`DonorBank.outside`).
    """
    try:
        return {"photo_size": list(io.read_image(Path(source)).size)}
    except FacecloakError:
        return {}


def _next_id(bank: DonorBank | None) -> int:
    """The number of the next donor's id: never one a removed donor had.

    It came from the donors left, so after the last one was removed its id went to a new donor,
    and a replaced face's record naming it then named another person.
    """
    if bank is None:
        return 1
    try:
        issued = int(json.loads((bank.folder / "bank.json").read_text(encoding="utf-8")).get("next_id", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        issued = 1
    # an id renamed by hand (any plain name is a valid one) was an int() traceback from every add
    numbered = [donor["id"][1:] for donor in bank.donors if re.fullmatch(r"d[0-9]+", donor["id"])]
    return max([issued, 1] + [int(number) + 1 for number in numbered])


def _commit(
    folder: Path,
    existing: DonorBank | None,
    records: list[dict],
    embeddings: dict[str, np.ndarray],
    models: Sequence[Embedder],
    source: dict,
    next_id: int,
) -> None:
    """Write all embeddings, then the manifest: the manifest is the commit point.

    ``next_id``: the number the next donor's id takes (`_next_id`), kept in the manifest.

    The new chips are written before (`add_donors`); until the manifest names them, a bank that
    is loaded does not see them, and a later add writes over them.
    """
    old_ids = existing.ids if existing is not None else []
    tables = {}
    for model in models:
        name = model.card.name
        old = existing.embeddings[name].numpy() if existing is not None and old_ids else None
        new = embeddings.get(name)
        parts = [p for p in (old, new) if p is not None and len(p)]
        tables[name] = (
            np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, model.card.embedding_dim))
        )
    ids = old_ids + [record["id"] for record in records]
    _write_npz(folder / "embeddings.npz", {"ids": np.array(ids, dtype=str), **tables})
    manifest = _manifest(folder, existing, models)
    kept = []
    if existing is not None:  # statistics as loaded: a bank made before a statistic gets it stored
        kept = [
            dict(donor, stats=[round(float(v), 4) for v in row])
            for donor, row in zip(existing.donors, existing.stats)
        ]
    manifest["donors"] = kept + records
    manifest["sources"] = (existing.sources if existing is not None else []) + [source]
    manifest["next_id"] = next_id
    _write_json(folder / "bank.json", manifest)


def _manifest(folder: Path, existing: DonorBank | None, models: Sequence[Embedder]) -> dict:
    from facecloak import __version__
    from facecloak.synthesis import CANONICAL_TEMPLATE

    return {
        "format": BANK_FORMAT,
        "name": existing.name if existing is not None else folder.name,
        "facecloak_version": __version__,
        "chip": {"size": CHIP_SIZE_PX, "template": [list(point) for point in CANONICAL_TEMPLATE]},
        "models": {
            model.card.name: {
                "fingerprint": model_fingerprint(model),
                "metric": model.card.distance,
                "threshold": model.card.match_threshold,
                "dim": model.card.embedding_dim,
            }
            for model in models
        },
        "note": "Donor photos are the user's; facecloak ships and downloads none. See 'licence' per donor.",
    }


def _make_bank_folder(folder: Path) -> None:
    """The bank's folder and its ``chips/``, the folder open to its owner alone (mode 0700).

    Faces of real people and their embeddings: under the usual umask (022) a bank was readable by
    every user of the machine. Made when the first donor is written, not before: a folder with no
    donor in it is no bank.
    """
    io.make_private_folder(folder)
    (folder / "chips").mkdir(exist_ok=True)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    io.make_private_folder(path.parent)
    buffer = io_bytes.BytesIO()
    np.savez(buffer, **arrays)
    io.write_bytes_atomic(path, buffer.getvalue(), overwrite=True)


def _write_json(path: Path, data: dict) -> None:
    io.make_private_folder(path.parent)
    io.write_bytes_atomic(path, json.dumps(data, indent=1).encode(), overwrite=True)


def remove_donors(bank: str | Path, ids: Sequence[str] = ()) -> int | None:
    """Remove donors ``ids`` from a bank, or the whole bank when no id is given; returns how many went.

    The whole bank: its own files (`BANK_FILES`), then its folder if nothing else is in it; a
    damaged bank too (None: its donors could not be counted).

    Raises:
        DonorBankError: no such bank, or an id not in it.
        ImageWriteError: a file of the bank could not be written (the message names it).
    """
    folder = _existing_bank_folder(bank)
    with bank_lock(folder) as lock_file:
        removed = _remove_donors(bank, ids)
        if lock_file is not None and not ids and not (folder / "bank.json").exists():
            lock_file.unlink(missing_ok=True)  # a removed bank leaves no ``.NAME.lock`` beside it
        return removed


def _remove_bank(folder: Path) -> int | None:
    """Delete the bank in ``folder``: its files, then the folder if empty; its donors' count, if known.

    The whole folder went: a bank made in a photo folder (``--bank photos/``) took the user's
    photos with it, and ``--bank .`` the working directory. A bank whose manifest is damaged could
    not be removed at all, though its error said to rebuild it.
    """
    try:
        count: int | None = len(load_bank(folder, allow_empty=True, embeddings=False))
    except DonorBankError:
        count = None
    if folder.is_symlink():  # a bank linked in: the link goes, the folder it names stays
        folder.unlink()
        return count
    for name in BANK_FILES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    with suppress(OSError):  # not empty: what is left is not the bank's
        folder.rmdir()
    return count


def _existing_bank_folder(bank: str | Path) -> Path:
    """The folder of ``bank``, which must hold a bank: `load_bank`'s error before any lock is taken.

    Removing or refreshing a mistyped bank made its folders (``--bank new/deep/bank`` made
    ``new/deep/``) and a lock file for it, and only then said there was no such bank.
    """
    folder = bank_folder(bank)
    if not (folder / "bank.json").is_file():
        load_bank(bank, allow_empty=True, embeddings=False)  # raises: no such bank, named
    return folder


def _remove_donors(bank: str | Path, ids: Sequence[str]) -> int | None:
    """`remove_donors` once the bank's lock is held."""
    if not ids:
        return _remove_bank(bank_folder(bank))
    bank_data = load_bank(bank, allow_empty=True)
    ids = list(dict.fromkeys(ids))  # a donor named twice is removed, and counted, once
    unknown = sorted(set(ids) - set(bank_data.ids))
    if unknown:
        raise DonorBankError(f"no donor {', '.join(unknown)} in bank {bank_data.name!r}")
    keep = [row for row, donor_id in enumerate(bank_data.ids) if donor_id not in set(ids)]
    tables = {name: table[keep].numpy() for name, table in bank_data.embeddings.items()}
    _write_npz(
        bank_data.folder / "embeddings.npz",
        {"ids": np.array([bank_data.ids[r] for r in keep], dtype=str), **tables},
    )
    manifest = json.loads((bank_data.folder / "bank.json").read_text(encoding="utf-8"))
    manifest["donors"] = [bank_data.donors[row] for row in keep]
    _write_json(bank_data.folder / "bank.json", manifest)
    for donor_id in ids:
        (bank_data.folder / "chips" / f"{donor_id}.png").unlink(missing_ok=True)
        (bank_data.folder / "chips" / f"{donor_id}@{DETAIL_SCALE}x.jpg").unlink(missing_ok=True)
    return len(ids)


def refresh_bank(
    bank: str | Path, models: Sequence[Embedder], detector: FaceDetector | None = None
) -> DonorBank:
    """Re-embed every donor's stored chip with ``models`` (after adding or changing a recogniser).

    Colour statistics are recomputed from the chips too, so a bank made by an older facecloak
    picks up new statistics, and a donor added before photo sizes were stored gets its photo's
    (read again from its source, where that still exists), so a face cut off by the photo's edge
    is found and left out (`DonorBank.usable`). The bank's embeddings are not read: this is how
    a bank whose embeddings are missing or damaged is mended (`load_bank` says to run it).
    """
    if not models:
        raise DonorBankError("no face model is available to embed donors; see `facecloak models`")
    with bank_lock(_existing_bank_folder(bank)):
        return _refresh_bank(bank, models, detector)


def _refresh_bank(bank: str | Path, models: Sequence[Embedder], detector: FaceDetector | None) -> DonorBank:
    """`refresh_bank` once the bank's lock is held."""
    bank_data = load_bank(bank, allow_empty=True, embeddings=False)
    # `EMBED_BLOCK` chips at a time, as `add_donors` does: every chip of the bank held as floats at
    # once (0.8 MB a donor, 8 GB for ten thousand) and detected in one batch did not scale
    detector = detector or FaceDetector()
    parts: dict[str, list[np.ndarray]] = {model.card.name: [] for model in models}
    measured = [torch.zeros(0, len(FACE_STATISTICS))]
    for start in range(0, len(bank_data), EMBED_BLOCK):
        rows = range(start, min(len(bank_data), start + EMBED_BLOCK))
        chips = bank_data.chips(rows)
        for name, table in embed_donor_chips(chips, models, detector).items():
            parts[name].append(table)
        measured.append(face_statistics(chips))
        for row in rows:
            bank_data._chips.pop(row, None)
    tables = {
        model.card.name: np.concatenate(parts[model.card.name])
        if parts[model.card.name]
        else np.zeros((0, model.card.embedding_dim), np.float32)
        for model in models
    }
    _write_npz(bank_data.folder / "embeddings.npz", {"ids": np.array(bank_data.ids, dtype=str), **tables})
    manifest = json.loads((bank_data.folder / "bank.json").read_text(encoding="utf-8"))
    manifest["models"] = _manifest(bank_data.folder, bank_data, models)["models"]
    stats = torch.cat(measured)
    for donor, row in zip(manifest["donors"], stats):
        donor["stats"] = [round(float(v), 4) for v in row]
        if "photo_size" not in donor:
            donor.update(_photo_size(donor["source"]))
    _write_json(bank_data.folder / "bank.json", manifest)
    return load_bank(bank_data.folder, allow_empty=True)
