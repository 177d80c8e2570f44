"""Quarter turns: faces in photos lying on their side or upside down.

MTCNN finds upright faces: in a scan or a photo whose EXIF orientation was stripped, a face turned
by 90 or 180 degrees is not found, and in an upside-down group photo it may find one face of
four. The detector (`facecloak.detect.FaceDetector`, ``rotations``) also looks in the photo turned
by a quarter, a half and three quarters (`turn_image`, exact: no resampling) and maps what it
finds back (`from_turned`), so every later stage works on the photo as given. Landmarks say how a
face is turned (`face_turns`); the stages that do not align by landmarks (dlib's shape predictor,
box crops) turn the face upright themselves.

Convention: ``k`` counts quarter turns as `torch.rot90` does over the last two dimensions (``k = 1``
takes the photo's left edge to the bottom); coordinates are ``(x, y)`` pixels, integer at pixel
centres, as in `facecloak.align`. Pure tensor functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def turn_image(image: Tensor, k: int) -> Tensor:
    """``image`` (..., H, W) turned by ``k`` quarter turns (`torch.rot90` over the last two dims).

    ``k = 0`` returns ``image`` itself (no copy of a 12 MP photo for the upright pass).
    """
    return image if k % 4 == 0 else torch.rot90(image, k % 4, dims=(-2, -1))


def to_turned(points: Tensor, k: int, height: int, width: int) -> Tensor:
    """(..., 2) points of an ``height`` x ``width`` photo, where they lie in it turned by ``k``.

    Example:
        >>> to_turned(torch.tensor([[2.0, 1.0]]), 1, height=5, width=7).tolist()
        [[1.0, 4.0]]
    """
    x, y = points[..., 0], points[..., 1]
    k %= 4
    if k == 0:
        return points.clone()
    if k == 1:
        turned = (y, width - 1 - x)
    elif k == 2:
        turned = (width - 1 - x, height - 1 - y)
    else:
        turned = (height - 1 - y, x)
    return torch.stack(turned, -1)


def from_turned(points: Tensor, k: int, height: int, width: int) -> Tensor:
    """(..., 2) points found in an ``height`` x ``width`` photo turned by ``k``, in the photo itself.

    The inverse of `to_turned` (``height`` and ``width`` are the unturned photo's).

    Example:
        >>> from_turned(torch.tensor([[1.0, 4.0]]), 1, height=5, width=7).tolist()
        [[2.0, 1.0]]
    """
    # turning the turned photo (``width`` x ``height`` for an odd k) on by the rest of a full turn
    turned_height, turned_width = (width, height) if k % 2 else (height, width)
    return to_turned(points, -k, turned_height, turned_width)


def _boxes_through(boxes: Tensor, mapping) -> Tensor:
    # a box's sides are pixel edges: ``x0, y0, x1, y1`` spans ``[x0 - 0.5, x1 - 0.5]`` (x1 exclusive,
    # as `facecloak.align.box_chip_from_image` reads it), so its corners are turned as the edge
    # points they are; turned as pixel centres, a box moved one pixel off its face along every
    # reversed axis (a turned face's box crop read a column of background instead of one of face)
    corners = mapping(boxes.view(-1, 2, 2) - 0.5) + 0.5
    return torch.cat([corners.amin(1), corners.amax(1)], 1)


def boxes_from_turned(boxes: Tensor, k: int, height: int, width: int) -> Tensor:
    """(N, 4) ``x0, y0, x1, y1`` boxes found in the photo turned by ``k``, in the photo itself."""
    return _boxes_through(boxes, lambda corners: from_turned(corners, k, height, width))


def boxes_to_turned(boxes: Tensor, k: int, height: int, width: int) -> Tensor:
    """(N, 4) boxes of the photo where they lie in it turned by ``k``: `boxes_from_turned` undone."""
    return _boxes_through(boxes, lambda corners: to_turned(corners, k, height, width))


def face_turns(landmarks: Tensor) -> Tensor:
    """(N,) the quarter turns (`turn_image`'s ``k``) that bring each face upright, from its five points.

    The face's "right" is the eye line (left eye to right eye) and its "down" runs from the eyes to
    the mouth; both vote, so one badly placed point does not turn a face. Faces rolled by up to 45
    degrees count as upright.

    Example:
        >>> upright = torch.tensor([[[30.0, 40.0], [70.0, 40.0], [50.0, 60.0], [35.0, 80.0], [65.0, 80.0]]])
        >>> face_turns(upright).tolist(), face_turns(to_turned(upright, 1, 100, 100)).tolist()
        ([0], [3])
    """
    if len(landmarks) == 0:
        return torch.zeros(0, dtype=torch.long)
    points = landmarks.double()
    right = points[:, 1] - points[:, 0]
    down = (points[:, 3] + points[:, 4] - points[:, 0] - points[:, 1]) / 2
    # "down" turned a quarter back is "right" for an upright face
    vote = right / right.norm(dim=-1, keepdim=True).clamp_min(1e-9) + torch.stack(
        [down[:, 1], -down[:, 0]], -1
    ) / down.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    angle = torch.atan2(vote[:, 1], vote[:, 0])  # 0 upright; pi/2: the face's right points down
    # a face whose right points down (angle pi/2) is upright in the photo turned by k = 1
    return torch.round(angle / (math.pi / 2)).long().remainder(4).cpu()


def turn_chip_affine(chip_from_image: Tensor, k: Tensor | int, size: int) -> Tensor:
    """(N, 2, 3) ``chip_from_image`` maps followed by turning each ``size`` x ``size`` chip by ``k``.

    A box crop (no landmark alignment) of a turned face is turned with it; this makes its chip
    upright, as the same face's box crop in the turned photo would be.
    """
    matrices = chip_from_image.double()
    turns = torch.as_tensor(k).expand(len(matrices)).tolist()
    rows = []
    for matrix, turn in zip(matrices, turns):
        # the chip's own pixels through `to_turned`: an affine map of the chip plane
        origin = to_turned(torch.zeros(1, 2, dtype=torch.float64), turn, size, size)[0]
        unit_x = to_turned(torch.tensor([[1.0, 0.0]], dtype=torch.float64), turn, size, size)[0] - origin
        unit_y = to_turned(torch.tensor([[0.0, 1.0]], dtype=torch.float64), turn, size, size)[0] - origin
        turn_map = torch.stack([unit_x, unit_y], 1)  # (2, 2): columns are where x and y go
        rows.append(torch.cat([turn_map @ matrix[:, :2], (turn_map @ matrix[:, 2:] + origin[:, None])], 1))
    return torch.stack(rows).to(chip_from_image.dtype) if rows else chip_from_image.clone()
