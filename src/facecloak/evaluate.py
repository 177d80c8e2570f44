"""How much matching accuracy a scraper loses: pure metrics first, then the whole protocol.

Protocol (Clearview-style scraper: detect, align, embed, nearest neighbour):
    - From a folder of people, draw the protected people and an unprotected control group (people
      with at least ``min_photos`` photos); each one's first ``probes`` photos are clean probes.
    - The protected people's other photos are protected (cloak, blur, ... or taken from a folder of
      already protected photos); the control's stay clean. Both then go through the upload
      transform under test (JPEG, downscale, blur) and into the scraper's gallery, with everyone
      else's clean photos as distractors.
    - Each attacker (every registry model, white-box when the cloak attacked it, and dlib's own C++
      pipeline when dlib-bin is installed) identifies each probe by its nearest gallery faces.
      Protection = 1 - rank-1 of the protected; the control's rank-1 shows the attacker works.
    - An adaptive attacker (FaceCure's point) cloaks photos of people outside the test, learns a
      linear map taking cloaked embeddings back to clean ones, and applies it to the gallery.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facecloak import io, quality, transforms
from facecloak._checks import check_choice
from facecloak.adaptive import ADAPTIVE_KINDS, finetune_model, finetune_summary
from facecloak.datasets import Person, Split, list_people, split_people
from facecloak.detect import FaceDetector
from facecloak.embed import embed_faces
from facecloak.errors import FacecloakError, InvalidInputError
from facecloak.faces import Faces
from facecloak.models.registry import Embedder, embedding_distance

CACHE_VERSION = 2
"""Bump when the embedding pipeline changes in a way cards and settings do not show."""

# -- pure metrics ------------------------------------------------------------------------------


def distance_matrix(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """(n, m) distances between rows of ``a`` (n, D) and ``b`` (m, D): Euclidean or 1 - cosine."""
    if metric == "euclidean":
        return torch.cdist(a.double(), b.double()).to(a.dtype)
    a_unit = torch.nn.functional.normalize(a, dim=1)
    b_unit = torch.nn.functional.normalize(b, dim=1)
    return 1.0 - a_unit @ b_unit.T


def rank_k_hits(
    gallery: Tensor,
    gallery_ids: Tensor,
    probes: Tensor,
    probe_ids: Tensor,
    k: int = 1,
    metric: str = "euclidean",
) -> Tensor:
    """(P,) whether each probe's identity is among its ``k`` nearest gallery entries.

    Rows of NaN (faces not found) are never matched. A probe that is NaN itself is a miss.

    Example:
        >>> gallery = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
        >>> rank_k_hits(gallery, torch.tensor([7, 8]), torch.tensor([[0.9, 0.1]]), torch.tensor([8]))
        tensor([True])
    """
    if len(probes) == 0:
        return torch.zeros(0, dtype=torch.bool)
    if len(gallery) == 0:
        return torch.zeros(len(probes), dtype=torch.bool)
    distances = distance_matrix(torch.nan_to_num(probes, nan=0.0), torch.nan_to_num(gallery, nan=0.0), metric)
    distances[:, torch.isnan(gallery).any(dim=1)] = math.inf
    nearest = distances.topk(min(k, len(gallery)), dim=1, largest=False).indices
    hits = (gallery_ids[nearest] == probe_ids[:, None]).any(dim=1)
    return hits & ~torch.isnan(probes).any(dim=1)


def rank_k_hit_rate(
    gallery: Tensor,
    gallery_ids: Tensor,
    probes: Tensor,
    probe_ids: Tensor,
    k: int = 1,
    metric: str = "euclidean",
) -> Tensor:
    """Share of probes whose identity is among their ``k`` nearest gallery entries (see `rank_k_hits`)."""
    hits = rank_k_hits(gallery, gallery_ids, probes, probe_ids, k, metric)
    return hits.float().mean() if len(hits) else torch.tensor(math.nan)


def tar_at_far(genuine: Tensor, impostor: Tensor, far: float = 1e-3) -> tuple[float, float]:
    """True-accept rate at a false-accept rate, for distances (accept when distance < threshold).

    The threshold is the largest one admitting at most ``far`` of the impostor pairs. A genuine
    pair that is NaN (a face the scraper could not find) counts as rejected.

    Returns:
        (tar, threshold).
    """
    impostor = impostor[~torch.isnan(impostor)].sort().values
    if len(genuine) == 0 or len(impostor) == 0:
        return math.nan, math.nan
    allowed = int(math.floor(far * len(impostor)))
    threshold = float(impostor[allowed]) if allowed < len(impostor) else math.inf
    accepted = torch.nan_to_num(genuine, nan=math.inf) < threshold
    return float(accepted.float().mean()), threshold


def verification_accuracy(distances: Tensor, same: Tensor, folds: Tensor) -> dict:
    """k-fold verification accuracy: each fold is scored at the threshold best on the other folds.

    Args:
        distances: (P,) pair distances (NaN for pairs with a face missing: scored as wrong).
        same: (P,) bool ground truth.
        folds: (P,) fold index of each pair.
    """
    accuracies, thresholds = [], []
    valid = ~torch.isnan(distances)
    for fold in folds.unique().tolist():
        train = (folds != fold) & valid
        test = folds == fold
        best_threshold = _best_threshold(distances[train].double(), same[train])
        predicted = torch.nan_to_num(distances[test], nan=math.inf) <= best_threshold
        correct = (predicted == same[test]) & valid[test]
        accuracies.append(float(correct.float().mean()))
        thresholds.append(best_threshold)
    return {
        "accuracy": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "fold_accuracies": accuracies,
        "thresholds": thresholds,
        "pairs_with_missing_face": int((~valid).sum()),
    }


def _best_threshold(distances: Tensor, same: Tensor) -> float:
    """The threshold, midway between observed distances, that classifies the most pairs right.

    Among equally good thresholds the middle one is taken.
    """
    values = distances.unique()  # sorted
    candidates = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-6])
    accuracy = ((distances[None, :] <= candidates[:, None]) == same[None, :]).double().mean(1)
    best = (accuracy == accuracy.max()).nonzero()[:, 0]
    return float(candidates[best[len(best) // 2]])


def fit_correction(source: Tensor, target: Tensor, ridge: float = 1e-2) -> Tensor:
    """Affine map (D+1, D) minimising ``|[source, 1] @ W - target|^2 + ridge |W|^2`` (ridge regression).

    The adaptive scraper's tool: learnt on pairs (cloaked embedding -> clean embedding).
    """
    design = torch.cat([source.double(), torch.ones(len(source), 1, dtype=torch.float64)], dim=1)
    regulariser = ridge * torch.eye(design.shape[1], dtype=torch.float64)
    regulariser[-1, -1] = 0.0
    weights = torch.linalg.solve(design.T @ design + regulariser, design.T @ target.double())
    return weights.to(source.dtype)


def apply_correction(embeddings: Tensor, weights: Tensor) -> Tensor:
    """Apply an affine map from `fit_correction` (NaN rows stay NaN)."""
    return torch.cat([embeddings, torch.ones(len(embeddings), 1, dtype=embeddings.dtype)], dim=1) @ weights


# -- attackers ---------------------------------------------------------------------------------


def centre_face(faces: Faces, width: int, height: int) -> int:
    """Index of the face whose box centre is nearest the image centre (LFW's subject convention)."""
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    return int((centres - torch.tensor([width / 2, height / 2])).norm(dim=1).argmin())


class Attacker:
    """A scraper's recognition pipeline: photos in, one embedding per photo (NaN if no face)."""

    name: str
    metric: str
    threshold: float
    dim: int

    @property
    def fingerprint(self) -> str:
        """Name plus a hash of everything that changes its embeddings (cache key)."""
        return self.name

    def embed(self, images: Sequence[Tensor]) -> Tensor:
        """(n, D) embedding of each photo's subject (the face nearest the centre), NaN if none."""
        raise NotImplementedError


class PipelineAttacker(Attacker):
    """facecloak's own pipeline with one registry model: MTCNN, similarity alignment, embedding."""

    def __init__(self, model: Embedder, detector: FaceDetector) -> None:
        self.model = model
        self.detector = detector
        self.name = model.card.name
        self.metric = model.card.distance
        self.threshold = model.card.match_threshold
        self.dim = model.card.embedding_dim

    @property
    def fingerprint(self) -> str:
        """Model card (template, alignment, landmarks...) and detector settings, hashed."""
        card = json.dumps(self.model.card.to_dict(), sort_keys=True, default=str)
        settings = f"{card}|{self.detector!r}|{CACHE_VERSION}"
        return f"{self.name}-{hashlib.sha1(settings.encode()).hexdigest()[:10]}"

    def embed(self, images: Sequence[Tensor]) -> Tensor:
        """Detect in batches of same-size photos, keep the centre face, embed all chips together."""
        out = torch.full((len(images), self.model.card.embedding_dim), math.nan)
        with torch.no_grad():
            faces = self.detector(list(images))
        chosen = []
        for i, image in enumerate(images):
            mine = (faces.image_index == i).nonzero()[:, 0]
            if len(mine):
                k = centre_face(faces.select(mine), image.shape[-1], image.shape[-2])
                chosen.append(int(mine[k]))
        if chosen:
            picked = faces.select(chosen)
            out[picked.image_index] = embed_faces(list(images), picked, self.model).cpu().float()
        return out


class DlibAttacker(Attacker):
    """dlib's own C++ pipeline (dlib-bin): HOG detector, 5-point predictor, ResNet descriptor.

    An implementation independent of facecloak's: its detector, landmarks, alignment and resampling
    all differ from the ones the cloak optimised through.
    """

    name = "dlib-cpp"
    metric = "euclidean"
    threshold = 0.6
    dim = 128

    def __init__(self) -> None:
        import dlib

        from facecloak.models.dlib_format import locate_package_model

        self._detector = dlib.get_frontal_face_detector()
        landmarks = locate_package_model("shape_predictor_5_face_landmarks.dat")
        self._predictor = dlib.shape_predictor(str(landmarks))
        self._model = dlib.face_recognition_model_v1(
            str(locate_package_model("dlib_face_recognition_resnet_model_v1.dat"))
        )

    @property
    def fingerprint(self) -> str:
        """Dlib's version: its pipeline is fixed."""
        import dlib

        return f"{self.name}-{dlib.__version__}"

    @staticmethod
    def available() -> bool:
        """Whether dlib (dlib-bin) can be imported here."""
        import importlib.util

        return importlib.util.find_spec("dlib") is not None

    def embed(self, images: Sequence[Tensor]) -> Tensor:
        """Descriptor of the face nearest each photo's centre (upsampling once, as dlib's examples do)."""
        out = torch.full((len(images), 128), math.nan)
        for i, image in enumerate(images):
            array = io.to_uint8(image)
            found = self._detector(array, 1)
            if not len(found):
                continue
            centres = torch.tensor([[(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2] for r in found])
            k = int((centres - torch.tensor([array.shape[1] / 2, array.shape[0] / 2])).norm(dim=1).argmin())
            shape = self._predictor(array, found[k])
            out[i] = torch.tensor(list(self._model.compute_face_descriptor(array, shape, 0)))
        return out


class EmbeddingCache:
    """Embeddings of clean files per attacker, kept on disk so repeated evaluations skip them."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.memory: dict[str, dict[str, np.ndarray]] = {}

    def _file(self, attacker: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{attacker}.npz"

    def _load(self, attacker: str) -> dict[str, np.ndarray]:
        if attacker not in self.memory:
            path = self._file(attacker)
            self.memory[attacker] = dict(np.load(path)) if path is not None and path.is_file() else {}
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
        self.folder.mkdir(parents=True, exist_ok=True)
        for attacker, table in self.memory.items():
            target = self._file(attacker)
            temporary = target.with_suffix(".tmp.npz")
            np.savez(temporary, **table)
            temporary.replace(target)


# -- upload transforms -------------------------------------------------------------------------


def _downscale_half(image: Tensor) -> Tensor:
    half = (max(1, image.shape[-2] // 2), max(1, image.shape[-1] // 2))
    return torch.nn.functional.interpolate(image[None], size=half, mode="area")[0]


UPLOADS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda image: image,
    "jpeg95": lambda image: io.jpeg_roundtrip(image, 95),
    "jpeg75": lambda image: io.jpeg_roundtrip(image, 75),
    "jpeg50": lambda image: io.jpeg_roundtrip(image, 50),
    "downscale0.5": lambda image: io.jpeg_roundtrip(_downscale_half(image), 85),
    "blur": lambda image: transforms.gaussian_blur(image[None], 1.0)[0],
}
"""What an upload site may do to a photo before the scraper sees it (one table row each).
``downscale0.5`` halves the photo and stores it as JPEG 85, as a thumbnailer does."""


# -- protections -------------------------------------------------------------------------------

ProtectFunction = Callable[[list[Tensor], list[Path], str], tuple[list[Tensor], list[dict]]]
"""(photos of one person, their paths, person name) -> (protected photos, one record per photo)."""

PROTECTION_METHODS = ("none", "cloak", "blur", "pixelate", "mask", "replace")


def anonymise_protection(method: str, detector: FaceDetector, **params) -> ProtectFunction:
    """Protection that anonymises every face found in each photo."""
    from facecloak.anonymize import anonymize_faces

    def protect(photos: list[Tensor], paths: list[Path], person: str) -> tuple[list[Tensor], list[dict]]:
        faces = detector(photos)
        outputs = []
        for k, photo in enumerate(photos):
            mine = faces.for_image(k)
            outputs.append(anonymize_faces(photo[None], mine, method, **params)[0] if len(mine) else photo)
        realism = realism_records(detector, photos, outputs, faces)
        counts = faces.count_per_image(len(photos))
        return outputs, [{"faces": n, "realism": r} for n, r in zip(counts, realism)]

    return protect


def realism_records(
    detector: FaceDetector, photos: list[Tensor], outputs: list[Tensor], faces: Faces
) -> list[dict]:
    """How much each protected photo still looks like a photo of a face: the realism beside protection.

    Per photo, for its subject (the face nearest the centre): whether a detector still finds it after
    JPEG 75 and with what confidence, against the original's, and `facecloak.quality.face_detail`
    (no reference needed) of the original and of the protected face. A blurred face is found less
    and has little detail; a replaced one should be found as surely and be as detailed as before.
    """
    uploaded = [io.jpeg_roundtrip(output, 75) for output in outputs]
    with torch.no_grad():
        found = detector(uploaded)
    records = []
    for i, (photo, after) in enumerate(zip(photos, uploaded)):
        mine = faces.for_image(i)
        if not len(mine):
            records.append({})
            continue
        k = centre_face(mine, photo.shape[-1], photo.shape[-2])
        box = mine.boxes[k]
        again = found.for_image(i)
        score = 0.0
        if len(again):
            overlaps = _box_iou(box, again.boxes)
            if float(overlaps.max()) >= 0.3:
                score = float(again.scores[int(overlaps.argmax())])
        records.append(
            {
                "found": score > 0,
                "score_original": float(mine.scores[k]),
                "score_protected": score,
                "detail_original": quality.face_detail(photo, box),
                "detail_protected": quality.face_detail(after, box),
            }
        )
    return records


def _box_iou(box: Tensor, boxes: Tensor) -> Tensor:
    top_left = torch.maximum(box[:2], boxes[:, :2])
    bottom_right = torch.minimum(box[2:], boxes[:, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(1)
    union = (box[2:] - box[:2]).prod() + (boxes[:, 2:] - boxes[:, :2]).prod(1) - inter
    return inter / union.clamp_min(1e-6)


def replace_protection(
    replacer, detector: FaceDetector, attackers: Sequence[Attacker] = ()
) -> ProtectFunction:
    """Protection that replaces every face with a verified donor mix (`facecloak.replace.FaceReplacer`).

    Each photo's record holds the replacer's per-face records, the realism of the subject face
    (`realism_records`) and, per attacker, whether the replaced subject (after JPEG 75) still
    matches any donor used: each donor's chip from the bank embedded by the attacker's own
    pipeline, accepted below the attacker's threshold. That share must be 0.
    """
    donor_embeddings: dict[tuple[str, str], Tensor] = {}

    def donor_embedding(attacker: Attacker, donor_id: str) -> Tensor:
        key = (attacker.name, donor_id)
        if key not in donor_embeddings:
            chip = io.read_image(replacer.bank.folder / "chips" / f"{donor_id}.png").pixels
            donor_embeddings[key] = attacker.embed([chip])[0]
        return donor_embeddings[key]

    def protect(photos: list[Tensor], paths: list[Path], person: str) -> tuple[list[Tensor], list[dict]]:
        faces = detector(photos)
        result = replacer(photos, faces)
        outputs = [image.cpu() for image in result.images]
        realism = realism_records(detector, photos, outputs, faces)
        uploaded = [io.jpeg_roundtrip(output, 75) for output in outputs]
        embedded = {attacker.name: attacker.embed(uploaded) for attacker in attackers}
        records = []
        for i, photo in enumerate(photos):
            rows = (faces.image_index == i).nonzero()[:, 0].tolist()
            mine = [result.records[r] for r in rows]
            record = {"faces": len(rows), "replace": mine, "realism": realism[i]}
            if rows:
                subject = mine[centre_face(faces.select(rows), photo.shape[-1], photo.shape[-2])]
                matches = {}
                for attacker in attackers:
                    embedding = embedded[attacker.name][i]
                    if subject.get("method") != "replace" or bool(torch.isnan(embedding).any()):
                        continue
                    donors = torch.stack([donor_embedding(attacker, d) for d in subject["donors"]])
                    distances = embedding_distance(donors, embedding[None], attacker.metric)
                    matches[attacker.name] = bool((distances < attacker.threshold).any())
                record["donor_match"] = matches
            records.append(record)
        return outputs, records

    return protect


def cloak_protection(cloak, detector: FaceDetector, *, batch: int = 8) -> ProtectFunction:
    """Protection that cloaks every face; a targeted cloak gets one identity key per person."""

    def protect(photos: list[Tensor], paths: list[Path], person: str) -> tuple[list[Tensor], list[dict]]:
        if hasattr(cloak, "identity_key"):
            cloak.identity_key = f"evaluation:{person}"
        outputs, records = [], []
        for start in range(0, len(photos), batch):
            chunk = photos[start : start + batch]
            faces = detector(chunk)
            result = cloak(chunk, faces)
            outputs += [image.cpu() for image in result.images]
            per_face = result.records(faces)
            for k in range(len(chunk)):
                mine = [r for r, i in zip(per_face, faces.image_index.tolist()) if i == k]
                records.append({"faces": len(mine), "cloak": mine})
        return outputs, records

    return protect


def folder_protection(folder: Path) -> ProtectFunction:
    """Protection already applied: read ``folder/<person>/<photo stem>[_tag].<ext>``."""

    def protect(photos: list[Tensor], paths: list[Path], person: str) -> tuple[list[Tensor], list[dict]]:
        outputs = []
        for path in paths:
            candidates = sorted((folder / person).glob(f"{path.stem}.*")) + sorted(
                (folder / person).glob(f"{path.stem}_*.*")
            )
            if not candidates:
                raise InvalidInputError(f"no protected version of {path.name}", folder / person)
            outputs.append(io.read_image(candidates[0]).pixels)
        return outputs, [{"source": "folder"} for _ in paths]

    return protect


# -- the protocol ------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """Every figure of an evaluation, with the settings that produced it."""

    settings: dict
    rows: list[dict] = field(default_factory=list)
    quality: dict = field(default_factory=dict)
    distances: dict = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready (example images are left to the HTML report)."""
        data = asdict(self)
        data["examples"] = [
            {k: v for k, v in e.items() if k not in ("original", "protected")} for e in self.examples
        ]
        return data

    def row(self, attacker: str, upload: str, adaptive: bool | str = False) -> dict:
        """The row of one attacker and upload transform."""
        for row in self.rows:
            if row["attacker"] == attacker and row["upload"] == upload and row["adaptive"] == adaptive:
                return row
        raise KeyError((attacker, upload, adaptive))


ProgressCallback = Callable[[str, int, int], None]


@dataclass
class _Photos:
    """Photos of a group of people: pixels, identity label and path, in a fixed order."""

    images: list[Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    def add(self, image: Tensor, label: int, path: Path) -> None:
        self.images.append(image)
        self.labels.append(label)
        self.paths.append(path)


def evaluate(
    data: str | Path,
    protect: ProtectFunction,
    attackers: Sequence[Attacker],
    *,
    method: str = "cloak",
    people: int | list[str] = 20,
    control: int = 20,
    min_photos: int = 10,
    probes: int = 2,
    uploads: Sequence[str] = ("none", "jpeg95", "jpeg75", "jpeg50", "downscale0.5", "blur"),
    adaptive_protect: ProtectFunction | None = None,
    adaptive_people: int = 20,
    adaptive_kind: str = "linear",
    max_distractors: int | None = None,
    seed: int = 0,
    cache: EmbeddingCache | None = None,
    settings: dict | None = None,
    on_progress: ProgressCallback | None = None,
) -> EvaluationResult:
    """Run the protocol of the module docstring.

    Args:
        data: folder with one sub-folder of photos per person.
        protect: the protection under test (see `cloak_protection`, `anonymise_protection`, ...).
        attackers: the scrapers to measure.
        method: name of the protection, for the report.
        people: how many people to protect (or their names).
        control: unprotected people measured alongside (the control).
        min_photos: protected and control people have at least this many photos.
        probes: clean photos held out per person.
        uploads: upload transforms, one row each (see `UPLOADS`).
        adaptive_protect: if given, run the adaptive attacker, protecting ``adaptive_people``
            further people's photos with it to learn the correction.
        adaptive_people: how many further people the adaptive attacker learns from.
        adaptive_kind: "linear" (a learnt map of embeddings), "finetune" (the model's last block
            fine-tuned, `facecloak.adaptive`; facecloak's own pipelines only) or "both".
        max_distractors: use at most this many distractor photos (drawn with ``seed``); None: all.
        seed: seed of the draw of people.
        cache: cache of clean embeddings (distractors and probes).
        settings: extra settings to record.
        on_progress: called with (stage, done, total).
    """
    for upload in uploads:
        check_choice(upload, tuple(UPLOADS), "upload")
    check_choice(adaptive_kind, ADAPTIVE_KINDS, "adaptive_kind")
    started = time.perf_counter()
    progress = on_progress or (lambda stage, done, total: None)
    cache = cache or EmbeddingCache(None)
    everyone = list_people(data)
    split = split_people(
        everyone, protected=people, control=control, min_photos=min_photos, probes=probes, seed=seed
    )
    result = EvaluationResult(
        settings={
            "data": str(data),
            "method": method,
            "protected_people": [p.name for p in split.protected],
            "control_people": len(split.control),
            "distractor_people": len(split.distractors),
            "max_distractors": max_distractors,
            "min_photos": min_photos,
            "probes": probes,
            "uploads": list(uploads),
            "attackers": [a.name for a in attackers],
            "adaptive_people": adaptive_people if adaptive_protect is not None else 0,
            "seed": seed,
            "versions": _versions(),
            **(settings or {}),
        }
    )
    labels = {person.name: index for index, person in enumerate(everyone)}

    # 1. protect the protected people's gallery photos
    clean, protected, records = _Photos(), _Photos(), []
    protect_started = time.perf_counter()
    for done, person in enumerate(split.protected):
        paths = list(split.gallery_photos(person))
        photos = [io.read_image(path).pixels for path in paths]
        outputs, person_records = protect(photos, paths, person.name)
        for path, photo, output, record in zip(paths, photos, outputs, person_records):
            clean.add(photo, labels[person.name], path)
            protected.add(output, labels[person.name], path)
            records.append(record)
        progress("protect", done + 1, len(split.protected))
    protect_seconds = time.perf_counter() - protect_started
    result.quality = _quality_summary(clean.images, protected.images, records)
    result.examples = _examples(clean, protected, everyone, count=4)

    # 2. the control's gallery photos and everyone's probes
    control = _Photos()
    for person in split.control:
        for path in split.gallery_photos(person):
            control.add(io.read_image(path).pixels, labels[person.name], path)
    probe_people = list(split.protected) + list(split.control)
    probe_paths = [path for person in probe_people for path in split.probe_photos(person)]
    probe_labels = torch.tensor([labels[p.name] for p in probe_people for _ in split.probe_photos(p)])
    is_protected_probe = torch.tensor(
        [i < len(split.protected) for i, p in enumerate(probe_people) for _ in split.probe_photos(p)]
    )
    distractor_pairs = [(path, labels[p.name]) for p in split.distractors for path in p.photos]
    if max_distractors is not None and max_distractors < len(distractor_pairs):
        order = np.random.default_rng(seed).permutation(len(distractor_pairs))[:max_distractors]
        distractor_pairs = [distractor_pairs[i] for i in sorted(order)]
    distractor_paths = [path for path, _ in distractor_pairs]
    distractor_labels = torch.tensor([label for _, label in distractor_pairs], dtype=torch.long)

    adaptive_pairs = None
    if adaptive_protect is not None:
        adaptive_pairs = _adaptive_training(
            everyone, split, adaptive_protect, adaptive_people, seed, progress
        )

    embed_seconds, embedded = 0.0, 0
    for a, attacker in enumerate(attackers):
        tick = time.perf_counter()
        probe_embeddings = _embed_files(
            attacker, probe_paths, cache, _stage(progress, f"probes ({attacker.name})")
        )
        distractors = _embed_files(
            attacker, distractor_paths, cache, _stage(progress, f"distractors ({attacker.name})")
        )
        clean_embeddings = _embed_in_batches(attacker, clean.images)
        embed_seconds += time.perf_counter() - tick
        embedded += len(probe_paths) + len(clean.images)
        result.distances[attacker.name] = _distance_summary(
            attacker, clean_embeddings, probe_embeddings, probe_labels, clean, distractors
        )
        correction, tuned = None, None
        if adaptive_pairs is not None and adaptive_kind in ("linear", "both"):
            source, target = (_embed_in_batches(attacker, images) for images in adaptive_pairs)
            keep = ~(torch.isnan(source).any(1) | torch.isnan(target).any(1))
            correction = fit_correction(source[keep], target[keep])
        if (
            adaptive_pairs is not None
            and adaptive_kind in ("finetune", "both")
            and isinstance(attacker, PipelineAttacker)
        ):
            tick = time.perf_counter()
            model = finetune_model(attacker.model, *adaptive_pairs, attacker.detector, seed=seed)
            tuned = PipelineAttacker(model, attacker.detector)
            tuned_probes = _embed_in_batches(tuned, [io.read_image(path).pixels for path in probe_paths])
            tuned_distractors = _embed_files(tuned, distractor_paths, EmbeddingCache(None), lambda d, t: None)
            result.settings.setdefault("finetune", {})[attacker.name] = finetune_summary(model)
            embed_seconds += time.perf_counter() - tick
        for u, upload in enumerate(uploads):
            tick = time.perf_counter()
            gallery_protected = _embed_in_batches(
                attacker, [UPLOADS[upload](image) for image in protected.images]
            )
            gallery_control = _embed_in_batches(
                attacker, [UPLOADS[upload](image) for image in control.images]
            )
            embed_seconds += time.perf_counter() - tick
            embedded += len(protected.images) + len(control.images)
            gallery = torch.cat([gallery_protected, gallery_control, distractors])
            gallery_ids = torch.cat(
                [torch.tensor(protected.labels), torch.tensor(control.labels), distractor_labels]
            )
            if u == 0:
                add_protected_distances(result, attacker, clean_embeddings, gallery_protected, upload)
            variants = [(False, gallery, probe_embeddings)]
            if correction is not None:
                variants.append(
                    (
                        "linear",
                        apply_correction(gallery, correction),
                        apply_correction(probe_embeddings, correction),
                    )
                )
            if tuned is not None:
                tuned_gallery = torch.cat(
                    [
                        _embed_in_batches(tuned, [UPLOADS[upload](image) for image in protected.images]),
                        _embed_in_batches(tuned, [UPLOADS[upload](image) for image in control.images]),
                        tuned_distractors,
                    ]
                )
                variants.append(("finetune", tuned_gallery, tuned_probes))
            for adaptive, gallery_used, probes_used in variants:
                result.rows.append(
                    _row(
                        attacker,
                        upload,
                        adaptive,
                        gallery_used,
                        gallery_ids,
                        probes_used,
                        probe_labels,
                        is_protected_probe,
                        len(gallery_protected),
                        gallery_protected,
                    )
                )
            progress(f"uploads ({attacker.name})", u + 1, len(uploads))
        cache.save()
        progress("attackers", a + 1, len(attackers))
    result.timings = {
        "total_seconds": round(time.perf_counter() - started, 2),
        "protect_seconds": round(protect_seconds, 2),
        "protected_photos": len(protected.images),
        "protect_seconds_per_photo": round(protect_seconds / max(1, len(protected.images)), 3),
        "embedded_photos": embedded,
        "embed_photos_per_second": round(embedded / max(embed_seconds, 1e-9), 2),
    }
    return result


def _stage(progress: ProgressCallback, stage: str) -> Callable[[int, int], None]:
    """A (done, total) callback reporting under ``stage``."""
    return lambda done, total: progress(stage, done, total)


def _versions() -> dict:
    from facecloak import __version__

    return {"facecloak": __version__, "torch": torch.__version__, "numpy": np.__version__}


def _embed_in_batches(attacker: Attacker, images: list[Tensor], batch: int = 32) -> Tensor:
    parts = [attacker.embed(images[i : i + batch]) for i in range(0, len(images), batch)]
    return torch.cat(parts) if parts else torch.zeros(0, attacker.dim)


def _embed_files(attacker: Attacker, paths: list[Path], cache: EmbeddingCache, progress) -> Tensor:
    """Embeddings of clean files, from the cache where possible (unreadable files give NaN rows)."""
    out = torch.full((len(paths), attacker.dim), math.nan)
    missing = []
    for i, path in enumerate(paths):
        cached = cache.get(attacker.fingerprint, path)
        if cached is None:
            missing.append(i)
        else:
            out[i] = torch.from_numpy(cached)
    for start in range(0, len(missing), 32):
        readable, images = [], []
        for i in missing[start : start + 32]:
            try:
                images.append(io.read_image(paths[i]).pixels)
                readable.append(i)
            except FacecloakError:
                continue
        if readable:
            out[readable] = attacker.embed(images)
        for i in missing[start : start + 32]:
            cache.put(attacker.fingerprint, paths[i], out[i].numpy())
        progress(min(start + 32, len(missing)), len(missing))
    return out


def _row(
    attacker,
    upload,
    adaptive,
    gallery,
    gallery_ids,
    probes,
    probe_ids,
    is_protected,
    n_protected,
    gallery_protected,
) -> dict:
    metric = attacker.metric
    ranks = {k: rank_k_hits(gallery, gallery_ids, probes, probe_ids, k, metric) for k in (1, 5)}
    protected, control = is_protected, ~is_protected
    genuine, impostor = _verification_pairs(
        gallery, gallery_ids, probes, probe_ids, protected, n_protected, metric
    )
    tar, threshold = tar_at_far(genuine, impostor, 1e-3)
    rank1_protected = float(ranks[1][protected].float().mean())
    return {
        "attacker": attacker.name,
        "upload": upload,
        "adaptive": adaptive,
        "protected_rank1": rank1_protected,
        "protected_rank5": float(ranks[5][protected].float().mean()),
        "control_rank1": float(ranks[1][control].float().mean()) if bool(control.any()) else math.nan,
        "control_rank5": float(ranks[5][control].float().mean()) if bool(control.any()) else math.nan,
        "protection": 1.0 - rank1_protected,
        "tar_at_far_1e-3": tar,
        "far_threshold": threshold,
        "protected_probes": int(protected.sum()),
        "control_probes": int(control.sum()),
        "protected_gallery_faces_found": float((~torch.isnan(gallery_protected).any(1)).float().mean())
        if len(gallery_protected)
        else math.nan,
        "gallery_size": len(gallery),
    }


def _verification_pairs(
    gallery, gallery_ids, probes, probe_ids, is_protected, n_protected, metric
) -> tuple[Tensor, Tensor]:
    """Genuine: protected people's clean probe vs their protected photos; impostor: vs everyone else's."""
    probe_rows = probes[is_protected]
    ids = probe_ids[is_protected]
    if len(probe_rows) == 0:
        return torch.zeros(0), torch.zeros(0)
    distances = distance_matrix(torch.nan_to_num(probe_rows), torch.nan_to_num(gallery), metric)
    distances[:, torch.isnan(gallery).any(1)] = math.nan
    distances[torch.isnan(probe_rows).any(1)] = math.nan
    same = ids[:, None] == gallery_ids[None, :]
    in_protected = torch.zeros(len(gallery), dtype=torch.bool)
    in_protected[:n_protected] = True
    genuine = distances[same & in_protected[None, :]]
    impostor = distances[~same]
    return genuine, impostor


def _distance_summary(attacker, clean, probes, probe_ids, photos: _Photos, distractors) -> dict:
    """Distances for the histograms: protected-vs-own-clean is filled in later by the caller."""
    labels = torch.tensor(photos.labels)
    genuine = []
    for i in range(len(clean)):
        same = probe_ids == labels[i]
        if bool(same.any()):
            genuine.append(
                distance_matrix(
                    torch.nan_to_num(clean[i : i + 1]), torch.nan_to_num(probes[same]), attacker.metric
                )[0]
            )
    genuine_values = torch.cat(genuine) if genuine else torch.zeros(0)
    impostor = distance_matrix(
        torch.nan_to_num(probes[:20]), torch.nan_to_num(distractors[:500]), attacker.metric
    ).flatten()
    return {
        "metric": attacker.metric,
        "threshold": attacker.threshold,
        "clean_genuine": [round(float(v), 4) for v in genuine_values if not math.isnan(float(v))],
        "impostor": [round(float(v), 4) for v in impostor[:2000]],
    }


def add_protected_distances(
    result: EvaluationResult, attacker: Attacker, clean: Tensor, protected: Tensor, upload: str
) -> None:
    """Record each protected photo's distance to its own clean version (the protection's displacement)."""
    distances = embedding_distance(clean, protected, attacker.metric)
    entry = result.distances.setdefault(attacker.name, {})
    entry["protected_vs_own_clean"] = [round(float(v), 4) for v in distances if not math.isnan(float(v))]
    entry["protected_upload"] = upload


def _adaptive_training(
    everyone, split: Split, protect: ProtectFunction, count: int, seed: int, progress
) -> tuple[list[Tensor], list[Tensor]]:
    """Protect photos of people outside the test; return (protected, clean) image lists to learn from."""
    used = {p.name for p in split.protected} | {p.name for p in split.control}
    pool = [p for p in everyone if p.name not in used and len(p.photos) >= 3]
    rng = np.random.default_rng(seed + 1)
    chosen = [pool[i] for i in rng.permutation(len(pool))[:count]]
    protected_images, clean_images = [], []
    for done, person in enumerate(chosen):
        paths = list(person.photos[:6])
        photos = [io.read_image(path).pixels for path in paths]
        outputs, _ = protect(photos, paths, person.name)
        uploaded = [UPLOADS["jpeg75"](output) for output in outputs]  # as the scraper collects them
        protected_images += uploaded + photos  # protected -> clean, and clean -> clean (keep clean intact)
        clean_images += photos + photos
        progress("adaptive training", done + 1, len(chosen))
    return protected_images, clean_images


def _stats(values: list[float]) -> dict:
    """Mean and max of the finite values (PSNR is infinite for an untouched photo), NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "max": math.nan}
    return {"mean": float(np.mean(finite)), "max": float(np.max(finite))}


def _quality_summary(clean: list[Tensor], protected: list[Tensor], records: list[dict]) -> dict:
    values = {"dssim": [], "psnr": [], "linf": []}
    for a, b in zip(clean, protected):
        if a.shape != b.shape:
            continue
        report = quality.quality_report(a, b)
        for key in values:
            values[key].append(report[key])
    face_dssim = [face["dssim"] for r in records for face in r.get("cloak", [])]
    summary = {key: _stats(vals) for key, vals in values.items()}
    summary["photos"] = len(values["dssim"])
    summary["per_photo"] = values
    if face_dssim:
        summary["face_region_dssim"] = _stats(face_dssim)
        cloaked = [face for r in records for face in r.get("cloak", []) if "ciede2000_mean" in face]
        if cloaked:
            summary["face_region_ciede2000_mean"] = _stats([face["ciede2000_mean"] for face in cloaked])
            summary["face_region_ciede2000_p99"] = _stats([face["ciede2000_p99"] for face in cloaked])
        cloak_faces = [face for r in records for face in r.get("cloak", [])]
        summary["cloak_faces"] = len(cloak_faces)
        summary["cloak_faces_protected"] = sum(face["protected"] for face in cloak_faces)
        summary["cloak_steps_mean"] = float(np.mean([face["steps"] for face in cloak_faces]))
    summary["photos_without_face"] = sum(1 for r in records if r.get("faces", 1) == 0)
    realism = [r["realism"] for r in records if r.get("realism")]
    if realism:
        summary["realism"] = {
            "subjects": len(realism),
            "redetected": float(np.mean([r["found"] for r in realism])),
            **{key: _stats([r[key] for r in realism])["mean"] for key in REALISM_KEYS},
        }
    replaced = [face for r in records for face in r.get("replace", [])]
    if replaced:
        matches: dict[str, list[bool]] = {}
        for r in records:
            for name, matched in r.get("donor_match", {}).items():
                matches.setdefault(name, []).append(matched)
        summary["replace"] = {
            "faces": len(replaced),
            "replaced": sum(face.get("method") == "replace" for face in replaced),
            "protected": sum(bool(face.get("protected")) for face in replaced),
            "blurred_small": sum(face.get("method") == "blur" for face in replaced),
            "attempts_mean": float(np.mean([face.get("attempts", 1) for face in replaced])),
            "subjects_matching_a_donor": {name: float(np.mean(v)) for name, v in matches.items()},
        }
    return summary


REALISM_KEYS = ("score_original", "score_protected", "detail_original", "detail_protected")


def _examples(clean: _Photos, protected: _Photos, everyone: list[Person], count: int) -> list[dict]:
    names = {index: person.name for index, person in enumerate(everyone)}
    step = max(1, len(clean.images) // max(1, count))
    examples = []
    for i in range(0, len(clean.images), step)[:count]:
        examples.append(
            {
                "person": names[clean.labels[i]],
                "photo": clean.paths[i].name,
                "original": clean.images[i],
                "protected": protected.images[i],
            }
        )
    return examples


# -- assembling a run from names (what the CLI asks for) ---------------------------------------


@dataclass(frozen=True)
class EvaluationRequest:
    """An evaluation described by names, as ``facecloak evaluate`` takes it."""

    data: Path
    method: str = "cloak"
    level: str = "mid"  # or "all"
    mode: str = "untargeted"
    models: str | None = None  # cloak's models, comma-separated; None: all available
    protected_dir: Path | None = None
    people: int = 20
    control: int = 20
    min_photos: int = 10
    probes: int = 2
    attackers: str | None = None  # comma-separated; None: all available models + dlib-cpp
    uploads: tuple[str, ...] = ("none", "jpeg95", "jpeg75", "jpeg50", "downscale0.5", "blur")
    adaptive: bool | str = False  # False, True (= "linear"), "linear", "finetune" or "both"
    adaptive_people: int = 20
    max_distractors: int | None = None
    leave_one_out: bool = False
    seed: int = 0
    cache: Path | None = None
    device: str | None = None
    donors: str | None = None  # replace: the donor bank's name or folder
    donors_per_face: int = 3


def build_attackers(names: str | None, detector: FaceDetector, device: str | None) -> list[Attacker]:
    """Attackers by name: registry models and "dlib-cpp"; default every available one."""
    from facecloak.models import available_embedders, create_embedder

    if names:
        wanted = [name.strip() for name in names.split(",") if name.strip()]
    else:
        wanted = available_embedders() + (["dlib-cpp"] if DlibAttacker.available() else [])
    attackers: list[Attacker] = []
    for name in wanted:
        if name == "dlib-cpp":
            if not DlibAttacker.available():
                raise InvalidInputError("attacker dlib-cpp needs dlib (pip install dlib-bin)")
            attackers.append(DlibAttacker())
        else:
            attackers.append(PipelineAttacker(create_embedder(name, device=device), detector))
    return attackers


def _protection(
    request: EvaluationRequest,
    level: str,
    models: list[Embedder],
    detector: FaceDetector,
    attackers: Sequence[Attacker] = (),
):
    from facecloak.cloak import create_cloak

    if request.method == "replace" and request.protected_dir is None:
        return replace_protection(_replacer(request, detector), detector, attackers), None
    if request.protected_dir is not None:
        return folder_protection(request.protected_dir), None
    if request.method == "none":
        return (lambda photos, paths, person: (photos, [{"faces": None} for _ in photos])), None
    if request.method == "cloak":
        cloak = create_cloak(request.mode, models, level, detector=detector, seed=request.seed)
        return cloak_protection(cloak, detector), cloak
    return anonymise_protection(request.method, detector), None


def _replacer(request: EvaluationRequest, detector: FaceDetector):
    from facecloak.donors import load_bank
    from facecloak.models import available_embedders, create_embedder
    from facecloak.replace import FaceReplacer

    if not request.donors:
        raise InvalidInputError("--method replace needs --donors BANK (see `facecloak donors add`)")
    models = [create_embedder(name, device=request.device) for name in available_embedders()]
    return FaceReplacer(
        load_bank(request.donors),
        models,
        donors_per_face=request.donors_per_face,
        seed=request.seed,
        detector=detector,
    )


def run_evaluation(
    request: EvaluationRequest, on_progress: ProgressCallback | None = None
) -> EvaluationResult:
    """Build models, attackers and protection from ``request`` and run `evaluate` (per level if "all").

    With ``leave_one_out`` (cloak, two or more models) each model is also left out of the cloak in
    turn and measured alone: the honest estimate for a model the cloak never saw.
    """
    from facecloak.models import available_embedders, create_embedder

    check_choice(request.method, PROTECTION_METHODS, "method")
    detector = FaceDetector(device=request.device)
    attackers = build_attackers(request.attackers, detector, request.device)
    names = [n.strip() for n in request.models.split(",")] if request.models else available_embedders()
    models = (
        [create_embedder(name, device=request.device) for name in names] if request.method == "cloak" else []
    )
    cache = EmbeddingCache(request.cache)
    levels = ["low", "mid", "high"] if request.level == "all" else [request.level]
    common = dict(
        max_distractors=request.max_distractors,
        people=request.people,
        control=request.control,
        min_photos=request.min_photos,
        probes=request.probes,
        seed=request.seed,
        cache=cache,
        on_progress=on_progress,
    )
    results = []
    for level in levels:
        protect, cloak = _protection(request, level, models, detector, attackers)
        adaptive = protect if request.adaptive else None
        adaptive_kind = "linear" if request.adaptive in (True, False, None) else str(request.adaptive)
        settings = {"level": level, "mode": request.mode, "cloak_models": names if models else []}
        if request.method == "replace":
            settings.update(donors=request.donors, donors_per_face=request.donors_per_face)
        if cloak is not None:
            settings["budget"] = asdict(cloak.budget)
        results.append(
            evaluate(
                request.data,
                protect,
                attackers,
                method=request.method if request.protected_dir is None else f"folder:{request.protected_dir}",
                uploads=request.uploads,
                adaptive_protect=adaptive,
                adaptive_people=request.adaptive_people,
                adaptive_kind=adaptive_kind,
                settings=settings,
                **common,
            )
        )
    for level, partial in zip(levels, results):
        for row in partial.rows:
            row["level"] = level if request.method == "cloak" else "-"
    result = results[-1] if len(results) == 1 else results[levels.index("mid")]
    if len(results) > 1:
        result.settings["level_sweep"] = [
            {
                "level": level,
                "dssim": r.quality.get("face_region_dssim", r.quality.get("dssim", {})).get("mean", math.nan),
                "rows": [row for row in r.rows if row["upload"] == "jpeg75" and not row["adaptive"]],
            }
            for level, r in zip(levels, results)
        ]
        result.rows = [row for r in results for row in r.rows]
    if request.leave_one_out and request.method == "cloak" and len(models) >= 2:
        result.settings["leave_one_out"] = _leave_one_out(request, models, detector, cache, on_progress)
    return result


def _leave_one_out(request, models, detector, cache, on_progress) -> list[dict]:
    from facecloak.cloak import create_cloak

    rows = []
    level = "mid" if request.level == "all" else request.level
    for left_out in models:
        kept = [m for m in models if m is not left_out]
        cloak = create_cloak(request.mode, kept, level, detector=detector, seed=request.seed)
        partial = evaluate(
            request.data,
            cloak_protection(cloak, detector),
            [PipelineAttacker(left_out, detector)],
            method="cloak",
            people=request.people,
            control=request.control,
            min_photos=request.min_photos,
            probes=request.probes,
            uploads=("jpeg75",),
            max_distractors=request.max_distractors,
            seed=request.seed,
            cache=cache,
            on_progress=on_progress,
        )
        for row in partial.rows:
            rows.append(
                dict(row, left_out=left_out.card.name, cloaked_with=",".join(m.card.name for m in kept))
            )
    return rows


def lfw_verification(
    pairs: Sequence,
    attackers: Sequence[Attacker],
    *,
    cache: EmbeddingCache | None = None,
    on_progress: ProgressCallback | None = None,
) -> dict[str, dict]:
    """k-fold verification accuracy of each attacker's pipeline on `facecloak.datasets.Pair`s.

    Each image is embedded once (its centre face); the threshold of each fold is chosen on the
    other folds (`verification_accuracy`). A pair with a face not found counts as wrong.
    """
    cache = cache or EmbeddingCache(None)
    progress = on_progress or (lambda stage, done, total: None)
    images = sorted({path for pair in pairs for path in (pair.first, pair.second)})
    index = {path: i for i, path in enumerate(images)}
    same = torch.tensor([pair.same for pair in pairs])
    folds = torch.tensor([pair.fold for pair in pairs])
    results = {}
    for attacker in attackers:
        started = time.perf_counter()
        embeddings = _embed_files(attacker, images, cache, _stage(progress, f"embed ({attacker.name})"))
        seconds = time.perf_counter() - started
        first = embeddings[[index[pair.first] for pair in pairs]]
        second = embeddings[[index[pair.second] for pair in pairs]]
        distances = embedding_distance(first, second, attacker.metric)
        results[attacker.name] = {
            **verification_accuracy(distances, same, folds),
            "pairs": len(pairs),
            "images": len(images),
            "faces_not_found": int(torch.isnan(embeddings).any(1).sum()),
            "images_per_second": round(len(images) / max(seconds, 1e-9), 2),
        }
        cache.save()
    return results
