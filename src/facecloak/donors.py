"""Donor banks: the faces that new faces are made from (`facecloak.replace`), kept as a plain folder.

A bank is a folder under ``$XDG_DATA_HOME/facecloak/donors/<name>`` (default
``~/.local/share/facecloak/donors``), copyable and inspectable:

    bank.json        manifest: format, models and their fingerprints, one record per donor (source
                     photo, box, landmarks, pose, colour statistics, the user's licence note)
    chips/<id>.png   each donor's canonical chip (`facecloak.synthesis`: 256 px, landmarks on
                     `CANONICAL_TEMPLATE`), what faces are synthesised from
    embeddings.npz   each recogniser's embedding of every chip (rows named by ``ids``)

Every embedding is computed from the stored chip, so a bank can be re-embedded from its own files
(`refresh_bank`) when recognisers are added, without its source photos. Writes are atomic: chips
first, then the embeddings, then the manifest (``os.replace``), so a bank is never half-written.

Donor photos are the user's (their own stock photos, a licensed or a synthetic face set):
facecloak ships none and downloads none.
"""

from __future__ import annotations

import datetime as _datetime
import hashlib
import io as io_bytes
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facecloak import io
from facecloak.detect import FaceDetector
from facecloak.embed import embed_faces
from facecloak.errors import DonorBankError, FacecloakError
from facecloak.faces import Faces
from facecloak.models.registry import Embedder
from facecloak.synthesis import CHIP_SIZE_PX, canonical_chips, estimate_pose, face_statistics

BANK_FORMAT = 1
"""Version of the on-disk layout; a bank of another version is refused with a way out."""

DEFAULT_BANK = "default"
DONOR_MIN_FACE_PX = 60
"""Smallest donor face (shorter box side) taken: smaller faces make blurry new faces."""

DONOR_MIN_SCORE = 0.95
"""Smallest detector confidence of a donor face."""

DONOR_MAX_YAW = 0.45
"""Donors turned further than this (`facecloak.synthesis.estimate_pose` units) are skipped."""

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def data_dir() -> Path:
    """Where banks live: ``$XDG_DATA_HOME/facecloak/donors`` (default ``~/.local/share/...``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "facecloak" / "donors"


def bank_folder(name: str | Path) -> Path:
    """The folder of bank ``name``: a name in `data_dir`, or the path of a bank folder itself."""
    given = Path(name).expanduser()
    if (given / "bank.json").is_file() or os.sep in str(name):
        return given
    if not NAME_PATTERN.match(str(name)):
        raise DonorBankError(f"bank name {name!r} must be letters, digits, '.', '_' or '-'")
    return data_dir() / str(name)


def model_fingerprint(model: Embedder) -> str:
    """A short hash of a model's card: what changes its embeddings (template, threshold, weights)."""
    card = json.dumps(model.card.to_dict(), sort_keys=True, default=str)
    return hashlib.sha1(card.encode()).hexdigest()[:12]


@dataclass
class DonorBank:
    """A loaded bank: statistics and embeddings in memory, chips read from disk when needed.

    Attributes:
        name: the bank's name (its folder's name).
        folder: where it lives.
        donors: one manifest record per donor (``id``, ``source``, ``licence``, ...).
        points: (N, 5, 2) landmarks in chip pixels.
        pose: (N, 3) ``yaw, pitch, roll`` (`facecloak.synthesis.estimate_pose`).
        stats: (N, 9) colour statistics (`facecloak.synthesis.FACE_STATISTICS`).
        embeddings: model name -> (N, D) embedding of each donor's chip.
        models: model name -> {"fingerprint", "metric", "threshold"} the bank was built with.
        sources: one record per ``add`` (folder, licence note, photos, skipped).
    """

    name: str
    folder: Path
    donors: list[dict]
    points: Tensor
    pose: Tensor
    stats: Tensor
    embeddings: dict[str, Tensor]
    models: dict[str, dict]
    sources: list[dict] = field(default_factory=list)
    _chips: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.donors)

    @property
    def ids(self) -> list[str]:
        """Donor ids, in row order."""
        return [donor["id"] for donor in self.donors]

    def chips(self, rows: Sequence[int]) -> Tensor:
        """(K, 3, S, S) float chips of donors at ``rows`` (read once, then kept as uint8)."""
        out = []
        for row in rows:
            if row not in self._chips:
                pixels = io.read_image(self.folder / "chips" / f"{self.donors[row]['id']}.png").pixels
                if pixels.shape[-2:] != (CHIP_SIZE_PX, CHIP_SIZE_PX):
                    raise DonorBankError(
                        f"chip of donor {self.donors[row]['id']} has the wrong size", self.folder
                    )
                self._chips[row] = (pixels * 255).round().to(torch.uint8)
            out.append(self._chips[row].float() / 255)
        return torch.stack(out) if out else torch.zeros(0, 3, CHIP_SIZE_PX, CHIP_SIZE_PX)

    def check_models(self, models: Sequence[Embedder]) -> None:
        """Raise `DonorBankError` unless the bank was built with exactly these models (same cards)."""
        wanted = {model.card.name: model_fingerprint(model) for model in models}
        have = {name: entry["fingerprint"] for name, entry in self.models.items()}
        if wanted != have:
            raise DonorBankError(
                f"bank {self.name!r} was built with models {_describe(have)} but this run uses "
                f"{_describe(wanted)}; run `facecloak donors refresh {self.name}` to re-embed its donors"
            )

    def summary(self) -> dict:
        """Name, folder, size, models and licence notes, for ``facecloak donors list``."""
        return {
            "name": self.name,
            "folder": str(self.folder),
            "donors": len(self),
            "models": sorted(self.models),
            "licences": sorted({donor.get("licence", "") for donor in self.donors}),
            "sources": [source.get("folder") for source in self.sources],
        }


def _describe(models: dict[str, str]) -> str:
    return ", ".join(sorted(models)) if models else "(none)"


# -- reading -----------------------------------------------------------------------------------


def load_bank(name: str | Path = DEFAULT_BANK, *, allow_empty: bool = False) -> DonorBank:
    """Load a bank by name (or folder path).

    Raises:
        DonorBankError: no such bank, an empty bank, or a damaged one; the message says what to run.
    """
    folder = bank_folder(name)
    manifest_path = folder / "bank.json"
    label = Path(name).name
    if not manifest_path.is_file():
        raise DonorBankError(
            f"no donor bank {label!r} (looked in {folder}); create it with "
            f"`facecloak donors add PHOTOS_DIR --bank {label}`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise DonorBankError(f"bank manifest is unreadable ({error})", manifest_path) from None
    if manifest.get("format") != BANK_FORMAT:
        raise DonorBankError(
            f"bank format {manifest.get('format')} is not {BANK_FORMAT}; "
            "rebuild it with `facecloak donors add`",
            manifest_path,
        )
    donors = manifest.get("donors", [])
    if not donors and not allow_empty:
        raise DonorBankError(
            f"donor bank {label!r} is empty; add photos with `facecloak donors add PHOTOS_DIR --bank {label}`"
        )
    embeddings = _read_embeddings(folder, [d["id"] for d in donors], manifest.get("models", {}))
    return DonorBank(
        name=manifest.get("name", label),
        folder=folder,
        donors=donors,
        points=_tensor([d["chip_landmarks"] for d in donors], (0, 5, 2)),
        pose=_tensor([d["pose"] for d in donors], (0, 3)),
        stats=_tensor([d["stats"] for d in donors], (0, 9)),
        embeddings=embeddings,
        models=manifest.get("models", {}),
        sources=manifest.get("sources", []),
    )


def _tensor(rows: list, empty_shape: tuple[int, ...]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32) if rows else torch.zeros(empty_shape)


def _read_embeddings(folder: Path, ids: list[str], models: dict) -> dict[str, Tensor]:
    path = folder / "embeddings.npz"
    if not ids:
        return {name: torch.zeros(0, 1) for name in models}
    try:
        with np.load(path) as data:
            stored_ids = [str(v) for v in data["ids"]]
            tables = {name: data[name] for name in models}
    except (OSError, KeyError, ValueError) as error:
        raise DonorBankError(
            f"bank embeddings are missing or damaged ({error}); run `facecloak donors refresh {folder.name}`",
            path,
        ) from None
    row = {donor_id: i for i, donor_id in enumerate(stored_ids)}
    missing = [donor_id for donor_id in ids if donor_id not in row]
    if missing:
        raise DonorBankError(
            f"{len(missing)} donor(s) have no embedding; run `facecloak donors refresh {folder.name}`", path
        )
    order = [row[donor_id] for donor_id in ids]
    return {
        name: torch.from_numpy(np.asarray(table[order], dtype=np.float32)) for name, table in tables.items()
    }


def list_banks() -> list[dict]:
    """Summaries of every bank in `data_dir` (a damaged one says why)."""
    root = data_dir()
    summaries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            summaries.append(load_bank(folder, allow_empty=True).summary())
        except FacecloakError as error:
            summaries.append({"name": folder.name, "folder": str(folder), "error": str(error)})
    return summaries


# -- writing -----------------------------------------------------------------------------------


@dataclass
class AddReport:
    """What ``add_donors`` did: donors added, photos skipped (no usable face) or failed, with reasons."""

    bank: str
    folder: str
    added: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    total_donors: int = 0

    def __str__(self) -> str:
        lines = [
            f"bank {self.bank}: {len(self.added)} donor(s) added, {self.total_donors} in all ({self.folder})"
        ]
        if self.skipped:
            lines.append(f"  {len(self.skipped)} photo(s) skipped (no usable face):")
            lines += [f"    {path}: {reason}" for path, reason in self.skipped]
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
    existing = load_bank(folder, allow_empty=True) if (folder / "bank.json").is_file() else None
    if existing is not None:
        existing.check_models(models)
    detector = detector or FaceDetector()
    jobs, _ = io.collect_images(paths)
    report = AddReport(bank=folder.name, folder=str(folder))
    records: list[dict] = []
    chips: list[Tensor] = []
    next_id = _next_id(existing)
    now = _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds")
    for done, job in enumerate(jobs):
        try:
            image = io.read_image(job.path)
        except FacecloakError as error:
            report.failed.append((str(job.path), str(error)))
            continue
        with torch.no_grad():
            faces = detector([image.pixels])
        usable, reason = _usable_faces(faces, all_faces)
        if not usable:
            report.skipped.append((str(job.path), reason))
            continue
        picked = faces.select(usable)
        face_chips, chip_points = canonical_chips(image.pixels[None], picked.landmarks, picked.image_index)
        face_chips = (face_chips * 255).round() / 255  # exactly what the PNG will hold
        poses = estimate_pose(picked.landmarks)
        stats = face_statistics(face_chips)
        for k in range(len(picked)):
            donor_id = f"d{next_id:05d}"
            next_id += 1
            records.append(
                {
                    "id": donor_id,
                    "source": str(job.path.resolve()),
                    "box": [round(float(v), 2) for v in picked.boxes[k]],
                    "landmarks": [[round(float(v), 2) for v in point] for point in picked.landmarks[k]],
                    "score": round(float(picked.scores[k]), 4),
                    "chip_landmarks": [[round(float(v), 3) for v in point] for point in chip_points[k]],
                    "pose": [round(float(v), 4) for v in poses[k]],
                    "stats": [round(float(v), 4) for v in stats[k]],
                    "licence": licence,
                    "added": now,
                }
            )
            chips.append(face_chips[k])
        if on_progress is not None:
            on_progress(done + 1, len(jobs))
    embeddings = embed_donor_chips(torch.stack(chips), models, detector) if chips else {}
    source = {
        "folder": ", ".join(str(Path(p).resolve()) for p in paths),
        "licence": licence,
        "added": now,
        "photos": len(jobs),
        "donors": len(records),
        "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
    }
    _commit(folder, existing, records, chips, embeddings, models, source)
    report.added = [record["id"] for record in records]
    report.total_donors = (len(existing) if existing is not None else 0) + len(records)
    return report


def _usable_faces(faces: Faces, all_faces: bool) -> tuple[list[int], str]:
    """Indices of the donor-worthy faces of one photo, or none and the reason."""
    if len(faces) == 0:
        return [], "no face found"
    sides = torch.minimum(faces.boxes[:, 2] - faces.boxes[:, 0], faces.boxes[:, 3] - faces.boxes[:, 1])
    yaw = estimate_pose(faces.landmarks)[:, 0].abs()
    good = (sides >= DONOR_MIN_FACE_PX) & (faces.scores >= DONOR_MIN_SCORE) & (yaw <= DONOR_MAX_YAW)
    if not bool(good.any()):
        largest = int(sides.argmax())
        if float(sides[largest]) < DONOR_MIN_FACE_PX:
            return (
                [],
                f"face too small to be a donor ({float(sides[largest]):.0f} px < {DONOR_MIN_FACE_PX} px)",
            )
        if float(yaw[largest]) > DONOR_MAX_YAW:
            return [], "face turned too far from the camera"
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


def _next_id(bank: DonorBank | None) -> int:
    if bank is None or not bank.donors:
        return 1
    return max(int(donor["id"][1:]) for donor in bank.donors) + 1


def _commit(
    folder: Path,
    existing: DonorBank | None,
    records: list[dict],
    chips: list[Tensor],
    embeddings: dict[str, np.ndarray],
    models: Sequence[Embedder],
    source: dict,
) -> None:
    """Write new chips, then all embeddings, then the manifest: the manifest is the commit point."""
    (folder / "chips").mkdir(parents=True, exist_ok=True)
    for record, chip in zip(records, chips):
        io.write_image(folder / "chips" / f"{record['id']}.png", chip, overwrite=True)
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
    manifest["donors"] = (existing.donors if existing is not None else []) + records
    manifest["sources"] = (existing.sources if existing is not None else []) + [source]
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


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io_bytes.BytesIO()
    np.savez(buffer, **arrays)
    io.write_bytes_atomic(path, buffer.getvalue(), overwrite=True)


def _write_json(path: Path, data: dict) -> None:
    io.write_bytes_atomic(path, json.dumps(data, indent=1).encode(), overwrite=True)


def remove_donors(bank: str | Path, ids: Sequence[str] = ()) -> int:
    """Remove donors ``ids`` from a bank, or the whole bank when no id is given; returns how many went.

    Raises:
        DonorBankError: no such bank, or an id not in it.
        ImageWriteError: a file of the bank could not be written (the message names it).
    """
    bank_data = load_bank(bank, allow_empty=True)
    if not ids:
        shutil.rmtree(bank_data.folder)
        return len(bank_data)
    unknown = sorted(set(ids) - set(bank_data.ids))
    if unknown:
        raise DonorBankError(f"no donor {', '.join(unknown)} in bank {bank_data.name!r}")
    keep = [row for row, donor_id in enumerate(bank_data.ids) if donor_id not in set(ids)]
    tables = {name: table[keep].numpy() for name, table in bank_data.embeddings.items()}
    _write_npz(
        bank_data.folder / "embeddings.npz",
        {"ids": np.array([bank_data.ids[r] for r in keep], dtype=str), **tables},
    )
    manifest = json.loads((bank_data.folder / "bank.json").read_text())
    manifest["donors"] = [bank_data.donors[row] for row in keep]
    _write_json(bank_data.folder / "bank.json", manifest)
    for donor_id in ids:
        (bank_data.folder / "chips" / f"{donor_id}.png").unlink(missing_ok=True)
    return len(ids)


def refresh_bank(
    bank: str | Path, models: Sequence[Embedder], detector: FaceDetector | None = None
) -> DonorBank:
    """Re-embed every donor's stored chip with ``models`` (after adding or changing a recogniser).

    Colour statistics are recomputed from the chips too, so a bank made by an older facecloak
    picks up new statistics.
    """
    bank_data = load_bank(bank, allow_empty=True)
    if not models:
        raise DonorBankError("no face model is available to embed donors; see `facecloak models`")
    chips = bank_data.chips(range(len(bank_data)))
    embeddings = embed_donor_chips(chips, models, detector) if len(chips) else {}
    tables = {
        model.card.name: embeddings.get(model.card.name, np.zeros((0, model.card.embedding_dim), np.float32))
        for model in models
    }
    _write_npz(bank_data.folder / "embeddings.npz", {"ids": np.array(bank_data.ids, dtype=str), **tables})
    manifest = json.loads((bank_data.folder / "bank.json").read_text())
    manifest["models"] = _manifest(bank_data.folder, bank_data, models)["models"]
    stats = face_statistics(chips) if len(chips) else torch.zeros(0, 9)
    for donor, row in zip(manifest["donors"], stats):
        donor["stats"] = [round(float(v), 4) for v in row]
    _write_json(bank_data.folder / "bank.json", manifest)
    return load_bank(bank_data.folder, allow_empty=True)
