"""Targeted cloak: pull every photo of a person the same way, toward a synthetic identity from a key.

Fawkes' paper pulls a user's photos toward the embedding of another, real person chosen among
the farthest. We take no one's face: the target is synthesised per model from a per-person key,
as the person's own clean embedding moved by a fixed offset ``2 x aim x threshold`` long, in a
direction drawn from the key (SHA-256 seeded). Every photo cloaked with the same key, on any
day, is pushed the same way, so a person's cloaked photos stay a consistent "shifted identity"
instead of scattering; a different key gives an unrelated direction.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import torch
from torch import Tensor

from facecloak.cloak.base import Cloak, PersonReferences
from facecloak.faces import Faces


def key_direction(key: str, model_name: str, dim: int) -> Tensor:
    """(dim,) unit vector drawn deterministically from ``key`` and the model's name."""
    digest = hashlib.sha256(f"facecloak-target\0{key}\0{model_name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    return (direction / direction.norm()).float()


def synthetic_targets(clean: Tensor, direction: Tensor, length: float, metric: str) -> Tensor:
    """(N, D) targets: each clean embedding moved ``length`` along ``direction`` in the model's metric.

    Euclidean: ``clean + length * direction``. Cosine: rotate within the plane of the embedding and
    the direction's orthogonal part, so that 1 - cosine equals ``length`` (capped at a right angle).
    """
    direction = direction.to(clean)
    if metric == "euclidean":
        return clean + length * direction
    unit = clean / clean.norm(dim=-1, keepdim=True)
    orthogonal = direction - (unit @ direction)[:, None] * unit
    orthogonal = orthogonal / orthogonal.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cosine = max(0.0, 1.0 - length)
    angle = math.acos(cosine)
    return math.cos(angle) * unit + math.sin(angle) * orthogonal


class TargetedCloak(Cloak):
    """Pull each face toward its key's synthetic identity on every model.

    Args:
        identity_key: per-person secret; photos cloaked with the same key agree. None draws a
            fresh random key per call (consistent within the call only), whatever ``seed`` says:
            a key drawn from the seed would give everyone on seed 0 the same, guessable target.
        **kwargs: as `Cloak`.

    Example:
        >>> model = create_embedder("dlib-resnet")  # doctest: +SKIP
        >>> cloak = TargetedCloak([model], identity_key="alice-2026")  # doctest: +SKIP
    """

    name = "targeted"

    def __init__(self, models, level: str = "mid", *, identity_key: str | None = None, **kwargs) -> None:
        super().__init__(models, level, **kwargs)
        self.identity_key = identity_key
        self.targets: list[Tensor] = []

    def prepare(
        self,
        clean: list[Tensor],
        faces: Faces,
        identity: str | None = None,
        references: PersonReferences | None = None,
    ) -> None:
        """Make each face's target on each model from the key and its clean embedding.

        The key is the call's ``identity`` if given, else this cloak's ``identity_key``.
        """
        key = identity or self.identity_key or secrets.token_hex(16)
        self.targets = []
        for m, model in enumerate(self.models):
            card = model.card
            direction = key_direction(key, card.name, card.embedding_dim)
            length = 2.0 * self.budget.aim * card.match_threshold
            self.targets.append(synthetic_targets(clean[m], direction, length, card.distance))

    def objective(self, embeddings: list[Tensor | None], clean: list[Tensor], face_index: Tensor) -> Tensor:
        """Sum over models of the threshold-normalised distance to the target."""
        loss = torch.zeros(len(face_index), device=self.device)
        for m, (model, embedding) in enumerate(zip(self.models, embeddings)):
            if embedding is None:  # not in this step's models
                continue
            target = self.targets[m][face_index.to(self.targets[m].device)]
            loss = loss + model.distance(embedding, target) / self.thresholds[m]
        return loss
