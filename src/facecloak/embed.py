"""Embedding faces: detected landmarks -> aligned chips (per the model's card) -> embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from facecloak.align import align_faces, chip_from_landmarks
from facecloak.faces import Faces
from facecloak.landmarks import model_landmarks
from facecloak.models.registry import Embedder

EMBED_BATCH = 64


def face_chips(images: Tensor | Sequence[Tensor], faces: Faces, model: Embedder) -> Tensor:
    """(N, 3, S, S) chips of ``faces`` aligned as ``model``'s card says, differentiable w.r.t. the images."""
    device = model_device(model)
    size = model.card.input_size
    chip_from_image = chip_from_landmarks(model_landmarks(images, faces, model.card), model.card)
    chips = torch.zeros(len(faces), 3, size, size, device=device)
    for i in faces.image_index.unique().tolist():
        mine = (faces.image_index == i).nonzero()[:, 0]
        source = images[i][None].to(device)
        chips[mine] = align_faces(source, chip_from_image[mine].to(device), torch.zeros(len(mine), dtype=torch.long), size)
    return chips


def model_device(model: Embedder) -> torch.device:
    """The device a built model lives on (models are moved once, by whoever builds them)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def embed_chips(model: Embedder, chips: Tensor, batch_size: int = EMBED_BATCH) -> Tensor:
    """(N, D) embeddings of (N, 3, S, S) chips, in batches."""
    if len(chips) == 0:
        return torch.zeros(0, model.card.embedding_dim, device=chips.device)
    return torch.cat([model(chips[i : i + batch_size]) for i in range(0, len(chips), batch_size)])


def embed_faces(images: Tensor | Sequence[Tensor], faces: Faces, model: Embedder) -> Tensor:
    """(N, D) embeddings of ``faces`` (no gradient), one per face, in ``faces`` order.

    Example:
        >>> model = create_embedder("dlib-resnet")  # doctest: +SKIP
        >>> embed_faces([image.pixels], detect_faces([image.pixels]), model).shape
        torch.Size([1, 128])
    """
    with torch.no_grad():
        return embed_chips(model, face_chips(images, faces, model))
