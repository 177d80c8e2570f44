"""`Faces`: the one currency passed between detection, alignment, cloaking and anonymising.

"No face" is a `Faces` of length 0 (every tensor's first dimension is 0), never `None`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
"""The five landmarks, in order. "Left" is as the viewer sees it (the subject's right eye)."""


@dataclass(frozen=True)
class Faces:
    """Faces found in a batch of images.

    Coordinates are pixels of the original image, integer values at pixel centres.

    Attributes:
        boxes: (N, 4) float32, ``x1, y1, x2, y2``.
        landmarks: (N, 5, 2) float32, ``(x, y)`` in `LANDMARK_NAMES` order.
        scores: (N,) float32 detector confidence in [0, 1].
        image_index: (N,) int64, which image of the batch each face belongs to.
    """

    boxes: Tensor
    landmarks: Tensor
    scores: Tensor
    image_index: Tensor

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        shapes_ok = (
            self.boxes.shape == (n, 4)
            and self.landmarks.shape == (n, 5, 2)
            and self.scores.shape == (n,)
            and self.image_index.shape == (n,)
        )
        if not shapes_ok:
            raise ValueError(
                "Faces needs boxes (N,4), landmarks (N,5,2), scores (N,), image_index (N,); got "
                f"{tuple(self.boxes.shape)}, {tuple(self.landmarks.shape)}, "
                f"{tuple(self.scores.shape)}, {tuple(self.image_index.shape)}"
            )

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Faces:
        """A `Faces` holding no face."""
        return Faces(
            boxes=torch.zeros(0, 4, device=device),
            landmarks=torch.zeros(0, 5, 2, device=device),
            scores=torch.zeros(0, device=device),
            image_index=torch.zeros(0, dtype=torch.long, device=device),
        )

    @staticmethod
    def cat(parts: list[Faces]) -> Faces:
        """Concatenate several `Faces` (their `image_index` must already be global)."""
        if not parts:
            return Faces.empty()
        return Faces(
            boxes=torch.cat([p.boxes for p in parts]),
            landmarks=torch.cat([p.landmarks for p in parts]),
            scores=torch.cat([p.scores for p in parts]),
            image_index=torch.cat([p.image_index for p in parts]),
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.boxes.device

    def select(self, index: Tensor | slice | list[int]) -> Faces:
        """The faces picked by a boolean mask, index tensor, list or slice."""
        return Faces(
            boxes=self.boxes[index],
            landmarks=self.landmarks[index],
            scores=self.scores[index],
            image_index=self.image_index[index],
        )

    def for_image(self, i: int, *, reindex: bool = True) -> Faces:
        """The faces of image ``i``; with ``reindex`` their `image_index` becomes 0."""
        picked = self.select(self.image_index == i)
        if reindex:
            picked = Faces(
                picked.boxes, picked.landmarks, picked.scores, torch.zeros_like(picked.image_index)
            )
        return picked

    def count_per_image(self, num_images: int) -> list[int]:
        """How many faces each of ``num_images`` images holds."""
        return torch.bincount(self.image_index.cpu(), minlength=num_images).tolist()

    def to(self, device: torch.device | str) -> Faces:
        """The same faces on ``device``."""
        return Faces(*(t.to(device) for t in (self.boxes, self.landmarks, self.scores, self.image_index)))

    def shifted(self, offset: int) -> Faces:
        """The same faces with ``offset`` added to `image_index` (to merge batches)."""
        return Faces(self.boxes, self.landmarks, self.scores, self.image_index + offset)

    def scaled(self, factor: float) -> Faces:
        """The same faces with coordinates multiplied by ``factor`` (after detection on a resized image)."""
        return Faces(self.boxes * factor, self.landmarks * factor, self.scores, self.image_index)

    def to_records(self) -> list[dict]:
        """One plain dict per face, for JSON output."""
        return [
            {
                "image_index": int(self.image_index[i]),
                "box": [round(float(v), 2) for v in self.boxes[i]],
                "score": round(float(self.scores[i]), 4),
                "landmarks": {
                    name: [round(float(v), 2) for v in self.landmarks[i, k]]
                    for k, name in enumerate(LANDMARK_NAMES)
                },
            }
            for i in range(len(self))
        ]
