"""How much matching accuracy a scraper loses to a protection (``facecloak evaluate``).

The package, in the order data flows:

- `metrics`: pure tensor metrics (rank-k, TAR at FAR, k-fold verification, the linear correction);
- `attackers`: scrapers' recognition pipelines, built from model cards;
- `cache`: clean photos' embeddings kept on disk;
- `uploads`: what an upload site does to a photo;
- `protect`: the protect phase, running a `facecloak.protection.Protection` per person;
- `protocol`: `evaluate`, in three phases: protect -> collect -> score;
- `rows`: the typed `EvaluationRow` and `EvaluationResult`, and scoring one row from embeddings;
- `summary`: image-change, realism and replacement figures of the protect phase;
- `adaptive`: the fine-tuning adaptive scraper;
- `requests`: an evaluation from the CLI's names (`run_evaluation`);
- `lfw`: LFW-style verification accuracy.
"""

from __future__ import annotations

from facecloak.evaluate.attackers import Attacker, DlibAttacker, PipelineAttacker, centre_face
from facecloak.evaluate.cache import CACHE_VERSION, EmbeddingCache
from facecloak.evaluate.lfw import lfw_verification
from facecloak.evaluate.metrics import (
    apply_correction,
    distance_matrix,
    fit_correction,
    rank_k_hit_rate,
    rank_k_hits,
    tar_at_far,
    verification_accuracy,
)
from facecloak.evaluate.protect import PersonProtector, realism_records
from facecloak.evaluate.protocol import evaluate
from facecloak.evaluate.requests import (
    PROTECTION_METHODS,
    EvaluationRequest,
    build_attackers,
    build_protection,
    run_evaluation,
)
from facecloak.evaluate.rows import EvaluationResult, EvaluationRow, StageProgress
from facecloak.evaluate.uploads import DEFAULT_UPLOADS, UPLOADS

__all__ = [
    "CACHE_VERSION",
    "DEFAULT_UPLOADS",
    "PROTECTION_METHODS",
    "UPLOADS",
    "Attacker",
    "DlibAttacker",
    "EmbeddingCache",
    "EvaluationRequest",
    "EvaluationResult",
    "EvaluationRow",
    "PersonProtector",
    "PipelineAttacker",
    "StageProgress",
    "apply_correction",
    "build_attackers",
    "build_protection",
    "centre_face",
    "distance_matrix",
    "evaluate",
    "fit_correction",
    "lfw_verification",
    "rank_k_hit_rate",
    "rank_k_hits",
    "realism_records",
    "run_evaluation",
    "tar_at_far",
    "verification_accuracy",
]
