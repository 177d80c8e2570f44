"""The five points each face model aligns by, found inside the detected faces.

Most models align by MTCNN's own landmarks (eye centres, nose tip, mouth corners). dlib's network
was trained on chips aligned by dlib's 5-point shape predictor (eye corners, base of the nose);
facecloak runs its exact port of that predictor (`facecloak.models.dlib_shape`) in the MTCNN box
mapped to where dlib's detector would put its box, and so builds dlib's own chip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from facecloak.faces import Faces
from facecloak.models.dlib_shape import dlib_landmarks_many, mtcnn_box_to_dlib
from facecloak.models.registry import FaceModelCard


def model_landmarks(images: Tensor | Sequence[Tensor], faces: Faces, card: FaceModelCard) -> Tensor:
    """(N, 5, 2) the points ``card``'s template refers to, for every face, in image pixels.

    Args:
        images: the photos, (B, 3, H, W) or a list of (3, H_i, W_i).
        faces: detected faces (``image_index`` into ``images``).
        card: the model's card (``card.landmarks`` says which points).
    """
    if card.landmarks == "mtcnn" or len(faces) == 0:
        return faces.landmarks.float()
    points = torch.zeros(len(faces), 5, 2)
    owners = faces.image_index.unique().tolist()
    rows = [(faces.image_index == i).nonzero()[:, 0] for i in owners]
    boxes = [mtcnn_box_to_dlib(faces.boxes[mine].float().cpu()) for mine in rows]
    found = dlib_landmarks_many([images[i].detach() for i in owners], boxes)  # one pass for all photos
    for mine, landmarks in zip(rows, found):
        points[mine] = landmarks.float()
    return points
