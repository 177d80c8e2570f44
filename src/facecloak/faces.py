"""`Faces`: the one currency passed between detection, alignment, cloaking and anonymising.

"No face" is a `Faces` of length 0 (every tensor's first dimension is 0), never `None`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from facecloak.errors import InvalidInputError

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
        """One plain dict per face, for JSON output.

        The box is rounded outward to 2 decimals, so it holds the same pixels (`pixel_bounds`) as
        the exact one: a bottom edge at 201.0018 rounded to 201.0 lost a row, and the written
        file's DSSIM, measured over the reported box, differed from the cloak's own.
        """
        return [
            {
                "image_index": int(self.image_index[i]),
                "box": _outward(self.boxes[i].tolist()),
                "score": round(float(self.scores[i]), 4),
                "landmarks": {
                    name: [round(float(v), 2) for v in self.landmarks[i, k]]
                    for k, name in enumerate(LANDMARK_NAMES)
                },
            }
            for i in range(len(self))
        ]


def check_face_values(faces: Faces, sizes: Sequence[tuple[int, int]]) -> Faces:
    """Check that every face's numbers describe a face on its photo; return ``faces``.

    A `Faces` built by hand can hold what the detector never gives, which failed deep inside a
    stage or did nothing and said nothing: a NaN or infinite coordinate (a cloak failed converting
    it to a pixel; a NaN landmark gives a NaN embedding, whose NaN distance reads as past every
    threshold), a float ``image_index`` (a failed slice), a box with x2 <= x1 or y2 <= y1, or one
    wholly outside its photo (a cloak failed on a crop of negative size, an anonymiser changed
    nothing). A box partly outside its photo is a face cut off by the edge: it is kept.
    ``sizes``: each photo's ``(height, width)``, in ``image_index`` order. Run after
    `facecloak._checks.check_faces`, which checks the indices against the batch.
    """
    if faces.image_index.is_floating_point() or faces.image_index.is_complex():
        raise InvalidInputError(f"faces.image_index must hold integers, got {faces.image_index.dtype}")
    if len(faces) == 0:
        return faces
    for name in ("boxes", "landmarks", "scores"):
        if not bool(torch.isfinite(getattr(faces, name)).all()):
            raise InvalidInputError(f"faces.{name} must hold finite numbers (no NaN or infinity)")
    boxes = faces.boxes.detach().cpu().double()
    if not bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()):
        raise InvalidInputError("faces.boxes must be x1, y1, x2, y2 with x2 > x1 and y2 > y1")
    heights, widths = torch.tensor(sizes, dtype=torch.float64)[faces.image_index.cpu().long()].unbind(1)
    # pixel centres lie at 0 .. width - 1: the box must reach one of them
    on_photo = (
        (boxes[:, 2] >= 0) & (boxes[:, 3] >= 0) & (boxes[:, 0] <= widths - 1) & (boxes[:, 1] <= heights - 1)
    )
    if not bool(on_photo.all()):
        k = int((~on_photo).nonzero()[0, 0])
        height, width = int(heights[k]), int(widths[k])
        box = [round(float(v), 2) for v in boxes[k]]
        raise InvalidInputError(f"faces.boxes[{k}] {box} lies wholly outside its {width} x {height} photo")
    return faces


# --------------------------------------------------------------------------------------------------
# face regions: the pixels an anonymiser or a cloak may change, shared by both


def face_regions(faces: Faces, scale: float, image_size: tuple[int, int] | None = None) -> Tensor:
    """(N, 4) float ``x1, y1, x2, y2`` of each face's region: its box scaled by ``scale`` about its centre.

    Args:
        faces: the faces.
        scale: region side relative to the detection box (deface uses 1.3).
        image_size: ``(height, width)`` to clip the regions to the image; None leaves them unclipped.

    Example:
        >>> faces = Faces(torch.tensor([[10.0, 10.0, 30.0, 50.0]]), torch.zeros(1, 5, 2), torch.ones(1),
        ...               torch.zeros(1, dtype=torch.long))
        >>> face_regions(faces, 1.5).tolist()
        [[5.0, 0.0, 35.0, 60.0]]
    """
    centre = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    half = (faces.boxes[:, 2:] - faces.boxes[:, :2]) / 2 * scale
    boxes = torch.cat([centre - half, centre + half], dim=1)
    if image_size is None:
        return boxes
    height, width = image_size
    limits = torch.tensor([width - 1, height - 1] * 2, dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(boxes.clamp_min(0), limits)


def _outward(box: Sequence[float]) -> list[float]:
    """``x0, y0, x1, y1`` rounded to 2 decimals away from the box's inside."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [
        math.floor(x0 * 100) / 100,
        math.floor(y0 * 100) / 100,
        math.ceil(x1 * 100) / 100,
        math.ceil(y1 * 100) / 100,
    ]


def pixel_bounds(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """The integer ``x0, y0, x1, y1`` slice bounds that hold a float ``box`` whole, inside the image.

    Example:
        >>> pixel_bounds([-2.5, 3.2, 10.1, 99.0], 50, 40)
        (0, 3, 12, 50)
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    return (
        max(0, math.floor(x0)),
        max(0, math.floor(y0)),
        min(width, math.ceil(x1) + 1),
        min(height, math.ceil(y1) + 1),
    )


def region_mask(box: Tensor, x0: int, y0: int, height: int, width: int, shape: str, feather: float) -> Tensor:
    """(1, height, width) soft mask of one region ``box``, for the crop whose top-left is ``(x0, y0)``.

    ``shape`` is "ellipse" or "box". 1 well inside, falling to exactly 0 at the region's edge over
    ``feather`` (a fraction of the region's half-size), 0 outside: pixels outside are never touched.
    """
    ys = torch.arange(y0, y0 + height, dtype=box.dtype, device=box.device)[:, None]
    xs = torch.arange(x0, x0 + width, dtype=box.dtype, device=box.device)[None, :]
    centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half_w = ((box[2] - box[0]) / 2).clamp_min(0.5)
    half_h = ((box[3] - box[1]) / 2).clamp_min(0.5)
    dx, dy = (xs - centre_x) / half_w, (ys - centre_y) / half_h
    radius = torch.sqrt(dx * dx + dy * dy) if shape == "ellipse" else torch.maximum(dx.abs(), dy.abs())
    if feather <= 0:
        mask = (radius < 1).to(box.dtype)
    else:
        mask = ((1 - radius) / feather).clamp(0, 1)
    return mask[None]


def box_iou(box: Tensor, boxes: Tensor) -> Tensor:
    """(N,) intersection over union of one ``x1, y1, x2, y2`` box with each of (N, 4) ``boxes``.

    Example:
        >>> box_iou(torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([[1.0, 0.0, 3.0, 2.0]]))
        tensor([0.3333])
    """
    inter = _intersection(box, boxes)
    area = (box[2:] - box[:2]).prod()
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    return inter / (area + areas - inter).clamp_min(1e-6)


def box_min_overlap(box: Tensor, boxes: Tensor) -> Tensor:
    """(N,) MTCNN's "Min" overlap of ``box`` with each of ``boxes``: intersection over the smaller area.

    Near 1 for a box nested in another, where IoU stays low (`facecloak.mtcnn.nms_min_overlap`'s
    measure, on continuous boxes).
    """
    areas = torch.minimum((box[2:] - box[:2]).prod(), (boxes[:, 2:] - boxes[:, :2]).prod(dim=1))
    return _intersection(box, boxes) / areas.clamp_min(1e-6)


def _intersection(box: Tensor, boxes: Tensor) -> Tensor:
    """(N,) area shared by ``box`` and each of (N, 4) ``boxes``."""
    top_left = torch.maximum(box[:2], boxes[:, :2])
    bottom_right = torch.minimum(box[2:], boxes[:, 2:])
    return (bottom_right - top_left).clamp_min(0).prod(dim=1)


def boxes_overlap(box: Tensor, boxes: Tensor) -> Tensor:
    """(N,) whether each of (N, 4) ``boxes`` intersects ``box`` (``x1, y1, x2, y2``)."""
    return (boxes[:, 0] < box[2]) & (boxes[:, 2] > box[0]) & (boxes[:, 1] < box[3]) & (boxes[:, 3] > box[1])
