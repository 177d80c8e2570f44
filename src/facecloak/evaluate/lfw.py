"""LFW-style verification: k-fold accuracy of each attacker's pipeline on labelled pairs."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from facecloak.evaluate.attackers import Attacker
from facecloak.evaluate.cache import EmbeddingCache, embed_files
from facecloak.evaluate.metrics import verification_accuracy
from facecloak.evaluate.protocol import StageProgress, _stage
from facecloak.models.registry import embedding_distance


def lfw_verification(
    pairs: Sequence,
    attackers: Sequence[Attacker],
    *,
    cache: EmbeddingCache | None = None,
    on_progress: StageProgress | None = None,
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
        embeddings = embed_files(attacker, images, cache, _stage(progress, f"embed ({attacker.name})"))
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
