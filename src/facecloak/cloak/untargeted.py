"""Untargeted cloak: push each face's embedding away from its own identity on every model.

As in LowKey (Cherepanova et al., ICLR 2021) and Fawkes' released code: maximise the distance
between the cloaked face's embedding and the clean one. Each model's distance is divided by its
own match threshold, and a model stops pulling once it is past the aim, so no model dominates
the ensemble and the budget goes where it is still needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from facecloak._checks import check_range
from facecloak.cloak.base import Cloak, PersonReferences
from facecloak.errors import InvalidInputError
from facecloak.faces import Faces
from facecloak.models.registry import Embedder

DEFAULT_PERSON_LEVEL = True
"""Push each face away from its person's photos in the call, not only its own: on the leave-one-out
ablation (12 people, 24 probes per model left out) protection on the unseen model rose from 0.75 /
0.58 / 0.58 to 0.88 / 0.75 / 0.75 (dlib / MobileFace / HSE left out) at the same visibility."""

DEFAULT_LAGGARD_WEIGHT = 2.0
LAGGARD_AIM = 1.25
"""``laggard_weight``: extra pull, per unit of this weight, on every model still under LAGGARD_AIM
thresholds, on top of the pull toward the spending target that every model gets alike: the
budget goes first to the model that would leave the face NOT protected."""


class UntargetedCloak(Cloak):
    """Move every face at least ``aim`` x each model's threshold away from its clean embedding.

    Distance measure: each model's own (Euclidean for dlib, 1 - cosine for ArcFace-style models),
    normalised by its match threshold. Budget: see `facecloak.cloak.budget.LEVELS`.

    Example:
        >>> cloak = UntargetedCloak([create_embedder("dlib-resnet")], level="mid")  # doctest: +SKIP
        >>> result = cloak(images, detect_faces(images))  # doctest: +SKIP
        >>> result.protected  # doctest: +SKIP
        tensor([True])
    """

    name = "untargeted"

    def __init__(
        self,
        models: Sequence[Embedder],
        level: str = "mid",
        *,
        person_level: bool = DEFAULT_PERSON_LEVEL,
        laggard_weight: float = DEFAULT_LAGGARD_WEIGHT,
        people_per_photo: bool = False,
        **options: Any,
    ) -> None:
        """``person_level``: push away from the person's photos in this call (`prepare`).

        ``laggard_weight``: see `LAGGARD_AIM`. ``people_per_photo``: look for a face's person among
        the faces of its own photo only, never across the call's photos (the service: a call holds
        other clients' uploads). Everything else: as `Cloak`.
        """
        super().__init__(models, level, **options)
        self.person_level = bool(person_level)
        self.laggard_weight = check_range("laggard_weight", laggard_weight, 0.0, math.inf)
        self.people_per_photo = bool(people_per_photo)
        self._references: list[Tensor] | None = None
        self._counts = torch.zeros(0, dtype=torch.long)

    def person_references(self) -> PersonReferences | None:
        """The last call's per-face references and counts where `prepare` grouped photos; else None."""
        if self._references is None:
            return None
        return list(self._references), self._counts.clone()

    def settings(self) -> dict:
        """The base settings, whether the reference was the person, and the laggards' extra pull."""
        return {
            **super().settings(),
            "person_level": self.person_level,
            "laggard_weight": self.laggard_weight,
        }

    def prepare(
        self,
        clean: list[Tensor],
        faces: Faces,
        identity: str | None = None,
        references: PersonReferences | None = None,
    ) -> None:
        """With ``person_level``, each face's reference becomes the mean of the call's faces of its person.

        Person-level protection (OPOM, Zhong & Deng 2022) pushes a photo away from the person, not
        from its own embedding: the scraper matches a probe against *other* photos of them. The
        faces of one person are those within every model's threshold of each other in this call
        (so bystanders in the photos are not averaged in); a face alone keeps its own embedding.
        """
        self._references = None
        if references is not None:  # an earlier call's (`Cloak.__call__`)
            given, counts = references
            if any(len(table) != len(faces) for table in given) or len(counts) != len(faces):
                raise InvalidInputError(f"references hold another number of faces than {len(faces)}")
            self._references = [table.to(clean[m]) for m, table in enumerate(given)]
            self._counts = counts.clone()
            return
        if not self.person_level or len(faces) < 2:
            return
        same = torch.ones(len(faces), len(faces), dtype=torch.bool)
        for m, model in enumerate(self.models):
            table = clean[m]
            distances = model.distance(table[:, None], table[None])
            same &= (distances < self.thresholds[m]).cpu()
        if self.people_per_photo:  # another photo of the call is another client's upload
            image_index = faces.image_index.cpu()
            same &= image_index[:, None] == image_index[None]
        self._counts = same.sum(1)
        weights = same.float() / same.float().sum(1, keepdim=True)
        self._references = []
        for m, model in enumerate(self.models):
            centre = weights.to(clean[m].device) @ clean[m]
            if model.card.distance == "cosine":
                centre = torch.nn.functional.normalize(centre, dim=1)
            self._references.append(centre)

    def references(self, clean: list[Tensor]) -> PersonReferences:
        """The person's mean where `prepare` grouped photos; else each face's own embedding."""
        if self._references is None:
            return super().references(clean)
        return self._references, self._counts.clone()

    def objective(self, embeddings: list[Tensor | None], clean: list[Tensor], face_index: Tensor) -> Tensor:
        """Sum over models of how far each still is from the aim (0 once past it)."""
        references = self._references if self._references is not None else clean
        loss = torch.zeros(len(face_index), device=self.device)
        for m, (model, embedding) in enumerate(zip(self.models, embeddings)):
            if embedding is None:  # not in this step's models
                continue
            reference = references[m][face_index.to(references[m].device)]
            ratio = model.distance(embedding, reference) / self.thresholds[m]
            loss = loss + torch.relu(self.target_ratio - ratio)
            if self.laggard_weight > 0:
                loss = loss + self.laggard_weight * torch.relu(LAGGARD_AIM - ratio)
        return loss
