"""The five points each face model aligns by, found inside the detected faces.

Most models align by MTCNN's own landmarks (eye centres, nose tip, mouth corners). dlib's network
was trained on chips aligned by dlib's 5-point shape predictor (eye corners, base of the nose);
facecloak runs its exact port of that predictor (`facecloak.models.dlib_shape`) in the MTCNN box
mapped to where dlib's detector would put its box, and so builds dlib's own chip. The predictor
starts from an upright mean shape: a face lying on its side (`facecloak.turns`) is read in its
photo turned upright, and its points mapped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from facecloak.faces import Faces
from facecloak.models.dlib_shape import dlib_landmarks_many, mtcnn_box_to_dlib
from facecloak.models.registry import FaceModelCard
from facecloak.turns import boxes_to_turned, face_turns, from_turned, turn_image


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
    turns = face_turns(faces.landmarks)
    groups = sorted({(int(i), int(k)) for i, k in zip(faces.image_index.tolist(), turns.tolist())})
    rows, photos, boxes = [], [], []
    for i, k in groups:
        mine = ((faces.image_index.cpu() == i) & (turns == k)).nonzero()[:, 0]
        height, width = images[i].shape[-2:]
        rows.append((mine, k, height, width))
        photos.append(turn_image(images[i].detach(), k))
        boxes.append(mtcnn_box_to_dlib(boxes_to_turned(faces.boxes[mine].float().cpu(), k, height, width)))
    found = dlib_landmarks_many(photos, boxes)  # one pass for all photos
    for (mine, k, height, width), landmarks in zip(rows, found):
        points[mine] = from_turned(landmarks.float(), k, height, width)
    return points
