"""The typed result of an evaluation, and how one row is scored from a scraper's embeddings.

`EvaluationRow` is the schema the report reads (by attribute); ``to_json`` writes the keys the JSON
report has always had. `score_row` and the distance summaries are pure: embeddings in, figures out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor

from facecloak.evaluate.attackers import Attacker
from facecloak.evaluate.metrics import distance_matrix, rank_k_hits, tar_at_far, verification_pairs
from facecloak.models.registry import embedding_distance

StageProgress = Callable[[str, int, int], None]
"""Called with (stage, done, total) as the evaluator moves through its stages (a batch's
per-photo events are `facecloak.batch.ProgressCallback`, a different stream)."""

REPORTED_FAR = 1e-3
"""The false-accept rate each row's true-accept rate is read at (``tar_at_far_1e-3``)."""

HISTOGRAM_PROBES = 20
HISTOGRAM_DISTRACTORS = 500
HISTOGRAM_IMPOSTORS = 2000


@dataclass
class EvaluationRow:
    """One attacker's figures after one upload transform (and adaptive variant).

    ``to_json`` gives the report's keys: the field names, with ``tar_at_far_1e3`` written as
    ``tar_at_far_1e-3``, and ``level`` only when set (`run_evaluation` sets it). A probe the
    attacker finds no face in is a miss, for protected and control people alike (the scraper
    cannot search with it): ``*_probes_found`` say how many of the probes it could search with,
    so that protection the attacker's own detector gives (dlib's HOG misses some clean faces)
    can be told apart.
    """

    attacker: str
    upload: str
    adaptive: bool | str
    protected_rank1: float
    protected_rank5: float
    control_rank1: float
    control_rank5: float
    protection: float
    tar_at_far_1e3: float
    far_threshold: float
    protected_probes: int
    control_probes: int
    protected_gallery_faces_found: float
    gallery_size: int
    level: str | None = None
    protected_probes_found: int | None = None
    control_probes_found: int | None = None

    def to_json(self) -> dict:
        """The row as the JSON report writes it."""
        data = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "level" and value is None:
                continue
            data["tar_at_far_1e-3" if item.name == "tar_at_far_1e3" else item.name] = value
        return data


@dataclass
class EvaluationResult:
    """Every figure of an evaluation, with the settings that produced it."""

    settings: dict
    rows: list[EvaluationRow] = field(default_factory=list)
    quality: dict = field(default_factory=dict)
    distances: dict = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready (example images are left to the HTML report)."""
        data = asdict(self)
        data["rows"] = [row.to_json() for row in self.rows]
        data["examples"] = [
            {k: v for k, v in e.items() if k not in ("original", "protected")} for e in self.examples
        ]
        return data

    def row(self, attacker: str, upload: str, adaptive: bool | str = False) -> EvaluationRow:
        """The row of one attacker and upload transform.

        After a level sweep (``--level all``) the rows hold one per level: the row is that of the
        settings' level, which the other figures are of (the first, level "low", was given).
        """
        rows = [
            row
            for row in self.rows
            if row.attacker == attacker and row.upload == upload and row.adaptive == adaptive
        ]
        if not rows:
            raise KeyError((attacker, upload, adaptive))
        return next((row for row in rows if row.level == self.settings.get("level")), rows[0])


def score_row(
    attacker: Attacker,
    upload: str,
    adaptive: bool | str,
    gallery: Tensor,
    gallery_ids: Tensor,
    probes: Tensor,
    probe_ids: Tensor,
    is_protected: Tensor,
    gallery_protected: Tensor,
) -> EvaluationRow:
    """One row from embeddings: the gallery starts with the protected people's photos."""
    metric = attacker.metric
    ranks = {k: rank_k_hits(gallery, gallery_ids, probes, probe_ids, k, metric) for k in (1, 5)}
    protected, control = is_protected, ~is_protected
    genuine, impostor = verification_pairs(
        gallery, gallery_ids, probes, probe_ids, protected, len(gallery_protected), metric
    )
    tar, threshold = tar_at_far(genuine, impostor, REPORTED_FAR)
    if int((~torch.isnan(impostor)).sum()) < round(1 / REPORTED_FAR):
        tar = math.nan  # fewer impostor pairs than 1 / FAR: it was TAR at FAR 0, labelled 1e-3
    rank1_protected = float(ranks[1][protected].float().mean())
    found = ~torch.isnan(probes).any(dim=1)
    has_control = bool(control.any())
    return EvaluationRow(
        attacker=attacker.name,
        upload=upload,
        adaptive=adaptive,
        protected_rank1=rank1_protected,
        protected_rank5=float(ranks[5][protected].float().mean()),
        control_rank1=float(ranks[1][control].float().mean()) if has_control else math.nan,
        control_rank5=float(ranks[5][control].float().mean()) if has_control else math.nan,
        protection=1.0 - rank1_protected,
        tar_at_far_1e3=tar,
        far_threshold=threshold,
        protected_probes=int(protected.sum()),
        control_probes=int(control.sum()),
        protected_gallery_faces_found=float((~torch.isnan(gallery_protected).any(1)).float().mean())
        if len(gallery_protected)
        else math.nan,
        gallery_size=len(gallery),
        protected_probes_found=int(found[protected].sum()),
        control_probes_found=int(found[control].sum()),
    )


def add_protected_distances(
    result: EvaluationResult, attacker: Attacker, clean: Tensor, protected: Tensor, upload: str
) -> None:
    """Record each protected photo's distance to its own clean version (the protection's displacement)."""
    distances = embedding_distance(clean, protected, attacker.metric)
    entry = result.distances.setdefault(attacker.name, {})
    entry["protected_vs_own_clean"] = [round(float(v), 4) for v in distances if not math.isnan(float(v))]
    entry["protected_upload"] = upload


def distance_summary(
    attacker: Attacker,
    clean: Tensor,
    probes: Tensor,
    probe_ids: Tensor,
    labels: list[int],
    distractors: Tensor,
) -> dict:
    """Distances for the histograms (protected-vs-own-clean comes from `add_protected_distances`).

    ``labels`` are the identities of the ``clean`` gallery photos.
    """
    # faces not found (NaN rows) are left out: zeroed, they gave each a bogus distance (the other
    # embedding's norm), a bump in both histograms where no pair of faces was
    clean_found, probe_found = ~torch.isnan(clean).any(1), ~torch.isnan(probes).any(1)
    clean, gallery_ids = clean[clean_found], torch.tensor(labels, dtype=torch.long)[clean_found]
    probes, probe_ids = probes[probe_found], probe_ids[probe_found]
    distractors = distractors[~torch.isnan(distractors).any(1)]
    genuine = []
    for i in range(len(clean)):
        same = probe_ids == gallery_ids[i]
        if bool(same.any()):
            genuine.append(distance_matrix(clean[i : i + 1], probes[same], attacker.metric)[0])
    genuine_values = torch.cat(genuine) if genuine else torch.zeros(0)
    impostor = distance_matrix(
        probes[:HISTOGRAM_PROBES], distractors[:HISTOGRAM_DISTRACTORS], attacker.metric
    ).flatten()
    return {
        "metric": attacker.metric,
        "threshold": attacker.threshold,
        "clean_genuine": [round(float(v), 4) for v in genuine_values if not math.isnan(float(v))],
        "impostor": [round(float(v), 4) for v in impostor[:HISTOGRAM_IMPOSTORS]],
    }
