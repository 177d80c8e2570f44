"""Pure metrics of the evaluator: distances, rank-k identification, TAR at FAR, k-fold verification.

Tensors in, numbers out; nothing here reads a file or runs a model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from facecloak.errors import InvalidInputError
from facecloak.models.registry import distance_matrix


def rank_k_hits(
    gallery: Tensor,
    gallery_ids: Tensor,
    probes: Tensor,
    probe_ids: Tensor,
    k: int = 1,
    metric: str = "euclidean",
) -> Tensor:
    """(P,) whether each probe's identity is among its ``k`` nearest gallery entries.

    Rows of NaN (faces not found) are never matched, even when fewer than ``k`` rows are found
    (``topk`` would otherwise fill the ``k`` places with them). A probe that is NaN itself is a miss.

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
    nearest = distances.topk(min(k, len(gallery)), dim=1, largest=False)
    found = torch.isfinite(nearest.values)
    hits = ((gallery_ids[nearest.indices] == probe_ids[:, None]) & found).any(dim=1)
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

    Raises:
        InvalidInputError: pairs of fewer than two folds (no other fold to choose a threshold on:
            it was a RuntimeError traceback from ``max()``).

    A fold whose other folds hold no pair with both faces found has no threshold: its accuracy
    and threshold are NaN (not measured), and so is the mean.
    """
    if len(folds.unique()) < 2:
        raise InvalidInputError(
            f"k-fold verification needs pairs of at least 2 folds (each fold's threshold is chosen on "
            f"the others); got {len(distances)} pair(s) of {len(folds.unique())} fold(s)"
        )
    accuracies, thresholds = [], []
    valid = ~torch.isnan(distances)
    for fold in folds.unique().tolist():
        train = (folds != fold) & valid
        test = folds == fold
        if not train.any():
            accuracies.append(math.nan)
            thresholds.append(math.nan)
            continue
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
    """Affine map (D+1, D) minimising ``|[source, 1] @ W - target|^2 + ridge |W - I|^2`` (ridge regression).

    The adaptive scraper's tool: learnt on pairs (cloaked embedding -> clean embedding). The map
    is shrunk towards leaving embeddings as they are (``I``: the identity, no offset), not towards
    zero: learnt from fewer pairs than dimensions (a few people's photos), a map shrunk towards
    zero flattened every face onto the span of those few, and the scraper lost its own matches (a
    run with no protection at all reported a quarter of its probes protected by the linear one).
    """
    design = torch.cat([source.double(), torch.ones(len(source), 1, dtype=torch.float64)], dim=1)
    regulariser = ridge * torch.eye(design.shape[1], dtype=torch.float64)
    regulariser[-1, -1] = 0.0
    unchanged = torch.zeros(design.shape[1], target.shape[1], dtype=torch.float64)
    if source.shape[1] == target.shape[1]:  # same width: "as they are" is the identity
        unchanged[:-1] = torch.eye(source.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(
        design.T @ design + regulariser, design.T @ target.double() + regulariser @ unchanged
    )
    return weights.to(source.dtype)


def apply_correction(embeddings: Tensor, weights: Tensor) -> Tensor:
    """Apply an affine map from `fit_correction` (NaN rows stay NaN)."""
    return torch.cat([embeddings, torch.ones(len(embeddings), 1, dtype=embeddings.dtype)], dim=1) @ weights


def verification_pairs(
    gallery: Tensor,
    gallery_ids: Tensor,
    probes: Tensor,
    probe_ids: Tensor,
    is_protected: Tensor,
    n_protected: int,
    metric: str,
) -> tuple[Tensor, Tensor]:
    """Genuine: protected people's clean probe vs their protected photos; impostor: vs everyone else's.

    The first ``n_protected`` gallery rows are the protected photos; NaN rows give NaN distances.
    """
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
