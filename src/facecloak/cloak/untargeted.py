"""Untargeted cloak: push each face's embedding away from its own identity on every model.

As in LowKey (Cherepanova et al., ICLR 2021) and Fawkes' released code: maximise the distance
between the cloaked face's embedding and the clean one. Each model's distance is divided by its
own match threshold, and a model stops pulling once it is past the aim, so no model dominates
the ensemble and the budget goes where it is still needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from facecloak.cloak.base import Cloak


class UntargetedCloak(Cloak):
    """Move every face at least ``aim`` x each model's threshold away from its clean embedding.

    Distance measure: each model's own (Euclidean for dlib, 1 - cosine for ArcFace-style models),
    normalised by its match threshold. Budget: see `facecloak.cloak.budget.LEVELS`.

    Example:
        >>> cloak = UntargetedCloak([create_embedder("dlib-resnet")], level="mid")  # doctest: +SKIP
        >>> result = cloak(images, detect_faces(images))
        >>> result.protected
        tensor([True])
    """

    name = "untargeted"

    def objective(self, embeddings: list[Tensor], clean: list[Tensor], face_index: Tensor) -> Tensor:
        """Sum over models of how far each still is from the aim (0 once past it)."""
        loss = torch.zeros(len(face_index), device=embeddings[0].device)
        for m, (model, embedding) in enumerate(zip(self.models, embeddings)):
            reference = clean[m][face_index.to(clean[m].device)]
            ratio = model.distance(embedding, reference) / self.thresholds[m]
            loss = loss + torch.relu(self.target_ratio - ratio)
        return loss
