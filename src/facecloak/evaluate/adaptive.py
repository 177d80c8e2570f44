"""Adaptive scrapers: attackers that learn to undo a protection from photos they protected themselves.

A scraper can run the same cloak on photos of people it already knows (FaceCure, Radiya-Dixit &
Tramèr, ICLR 2022) and learn the way back. Two strengths are measured:

- ``linear``: a ridge-regression map from protected to clean embeddings
  (`facecloak.evaluate.metrics.fit_correction`), cheap and model-agnostic (dlib's C++ pipeline too).
- ``finetune``: FaceCure's robust training, as feature regression: a copy of the model whose last
  block (the trailing parameter tensors, at least `FINETUNE_SHARE` of its weights) is fine-tuned
  so that protected photos of other people embed where their clean photos do, while clean photos
  stay where they were (`finetune_model`). It changes the model itself, so the whole gallery is
  embedded again with it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from facecloak.detect import FaceDetector
from facecloak.embed import face_chips, model_device
from facecloak.models.registry import Embedder

ADAPTIVE_KINDS = ("linear", "finetune", "both")

FINETUNE_SHARE = 0.1
"""The fine-tuned block: the model's last parameter tensors, together at least this share of its weights."""

FINETUNE_EPOCHS = 10
FINETUNE_LEARNING_RATE = 1e-4
FINETUNE_BATCH = 32


def last_block(model: Embedder, share: float = FINETUNE_SHARE) -> list[torch.nn.Parameter]:
    """The trailing parameters of ``model`` (registration order) holding at least ``share`` of its weights."""
    parameters = [p for p in model.parameters() if p.is_floating_point()]
    total = sum(p.numel() for p in parameters)
    chosen, count = [], 0
    for parameter in reversed(parameters):
        chosen.append(parameter)
        count += parameter.numel()
        if count >= share * total:
            break
    return chosen


def _subject_chips(
    images: Sequence[Tensor], model: Embedder, detector: FaceDetector
) -> tuple[Tensor, Tensor]:
    """(n, 3, S, S) chips of each photo's centre face, and (len(images),) whether one was found."""
    from facecloak.evaluate.attackers import centre_face

    with torch.no_grad():
        faces = detector(list(images))
    chosen, found = [], torch.zeros(len(images), dtype=torch.bool)
    for i, image in enumerate(images):
        mine = (faces.image_index == i).nonzero()[:, 0]
        if len(mine):
            chosen.append(int(mine[centre_face(faces.select(mine), image.shape[-1], image.shape[-2])]))
            found[i] = True
    if not chosen:
        size = model.card.input_size
        return torch.zeros(0, 3, size, size, device=model_device(model)), found
    with torch.no_grad():
        return face_chips(list(images), faces.select(chosen), model), found


def finetune_model(
    model: Embedder,
    protected: Sequence[Tensor],
    clean: Sequence[Tensor],
    detector: FaceDetector,
    *,
    epochs: int = FINETUNE_EPOCHS,
    learning_rate: float = FINETUNE_LEARNING_RATE,
    seed: int = 0,
) -> Embedder:
    """A copy of ``model`` whose last block maps ``protected[i]`` onto the embedding of ``clean[i]``.

    Args:
        model: the scraper's model (left untouched).
        protected: photos after protection (and upload), of people outside the test.
        clean: the same photos, clean, in the same order (a clean photo may pair with itself:
            that keeps clean faces where they were).
        detector: finds each photo's centre face.
        epochs: passes over the pairs.
        learning_rate: Adam learning rate.
        seed: seed of the batch order and flips.
    """
    chips_in, found_in = _subject_chips(protected, model, detector)
    chips_out, found_out = _subject_chips(clean, model, detector)
    both = found_in & found_out
    protected_pairs = int((both & protected_pairs_mask(protected, clean)).sum())
    chips_in = chips_in[both[found_in]]
    chips_out = chips_out[both[found_out]]
    with torch.no_grad():
        targets = model(chips_out)
    tuned = copy.deepcopy(model).eval()
    tuned.requires_grad_(False)
    trainable = last_block(tuned)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(trainable, lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    count = len(chips_in)
    for _ in range(epochs if count else 0):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, FINETUNE_BATCH):
            rows = order[start : start + FINETUNE_BATCH].to(chips_in.device)
            batch, target = chips_in[rows], targets[rows]
            flips = (torch.rand(len(rows), generator=generator) < 0.5).to(batch.device).view(-1, 1, 1, 1)
            batch = torch.where(flips, batch.flip(-1), batch)
            loss = tuned.distance(tuned(batch), target).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    tuned.requires_grad_(False)
    tuned.adaptive_pairs = count  # type: ignore[attr-defined]
    tuned.adaptive_protected_pairs = protected_pairs  # type: ignore[attr-defined]
    return tuned


def finetune_summary(model: Embedder) -> dict:
    """What the fine-tuning rested on, for the report."""
    pairs = getattr(model, "adaptive_pairs", math.nan)
    protected_pairs = getattr(model, "adaptive_protected_pairs", math.nan)
    return {
        "pairs": pairs,
        "protected_pairs": protected_pairs,
        "trained_parameters": sum(p.numel() for p in last_block(model)),
    }


def protected_pairs_mask(protected: Sequence[Tensor], clean: Sequence[Tensor]) -> Tensor:
    """(n,) which pairs show a protected photo, not a clean one paired with itself.

    "pairs" alone counted the clean-to-clean ones too: a blur hides every face, so the scrapers
    learnt from no protected photo at all, and the report still said they rested on ten pairs.
    """
    return torch.tensor([source is not target for source, target in zip(protected, clean)], dtype=torch.bool)
