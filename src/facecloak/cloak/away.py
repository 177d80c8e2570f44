"""Away cloak: push each face beyond several given embeddings at once, each by its own margin.

The untargeted cloak pushes a face away from its own clean embedding. A replaced face
(`facecloak.replace`) must end far from other embeddings instead: the original face it stands in
for, and every donor mixed into it. A new face that misses one of those by a few percent (it sits
on the person's hair, outline and lighting) is finished with this cloak rather than blurred.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from facecloak.cloak.base import Cloak, PersonReferences
from facecloak.errors import InvalidInputError
from facecloak.faces import Faces
from facecloak.models.registry import Embedder


class AwayCloak(Cloak):
    """Move each face past ``margins`` x each model's threshold from every embedding in ``away_from``.

    Args:
        models: the face models to push on.
        away_from: per model, (N, R, D) embeddings each of the N faces must end far from; the
            first of the R is the face's reference, the one its records and check measure.
        margins: per model, (N, R) multiples of the model's threshold to reach from each.
        level, **options: as `Cloak`.

    Example:
        >>> cloak = AwayCloak(models, [original[:, None]], [torch.ones(1, 1)], level="low")  # doctest: +SKIP
        >>> result = cloak([photo], faces)  # doctest: +SKIP
    """

    name = "away"
    embeds_clean_faces = False  # the embeddings to leave are given

    def __init__(
        self,
        models: Sequence[Embedder],
        away_from: Sequence[Tensor],
        margins: Sequence[Tensor],
        level: str = "low",
        **options: Any,
    ) -> None:
        super().__init__(models, level, **options)
        if len(away_from) != len(self.models) or len(margins) != len(self.models):
            raise InvalidInputError("away_from and margins need one entry per model")
        for table, margin in zip(away_from, margins):
            if table.ndim != 3 or tuple(margin.shape) != tuple(table.shape[:2]):
                raise InvalidInputError("away_from must be (N, R, D) per model and margins (N, R)")
        self.away_from = [table.to(self.device, torch.float32) for table in away_from]
        self.margins = [margin.to(self.device, torch.float32) for margin in margins]

    def references(self, clean: list[Tensor]) -> PersonReferences:
        """Each face's first embedding to leave (the stopping rule and the check measure it)."""
        return [table[:, 0] for table in self.away_from], torch.ones(len(self.away_from[0]), dtype=torch.long)

    def prepare(
        self,
        clean: list[Tensor],
        faces: Faces,
        identity: str | None = None,
        references: PersonReferences | None = None,
    ) -> None:
        """Nothing to prepare: the embeddings to leave are given; only their count is checked."""
        if any(len(table) != len(faces) for table in self.away_from):
            raise InvalidInputError(
                f"away_from holds embeddings for another number of faces than {len(faces)}"
            )

    def progress(self, m: int, embedding: Tensor, clean: list[Tensor], face_index: Tensor) -> Tensor:
        """(n,) the nearest embedding to leave, as a multiple of its margin x model ``m``'s threshold.

        So a cloak that stops at its aim (``spend_budget=False``) stops once every embedding is
        past its own margin, the donors' included, not only the reference.
        """
        rows = face_index.to(self.device)
        distance = self.models[m].distance(embedding[:, None], self.away_from[m][rows])  # (n, R)
        return (distance / (self.thresholds[m] * self.margins[m][rows])).amin(1)

    def objective(self, embeddings: list[Tensor | None], clean: list[Tensor], face_index: Tensor) -> Tensor:
        """Sum, over models and embeddings to leave, of how far each still is from the aim."""
        loss = torch.zeros(len(face_index), device=self.device)
        for m, (model, embedding) in enumerate(zip(self.models, embeddings)):
            if embedding is None:  # not in this step's models
                continue
            rows = face_index.to(self.device)
            distance = model.distance(embedding[:, None], self.away_from[m][rows])  # (n, R)
            ratio = distance / (self.thresholds[m] * self.margins[m][rows])
            loss = loss + torch.relu(self.target_ratio - ratio).sum(1)
        return loss
