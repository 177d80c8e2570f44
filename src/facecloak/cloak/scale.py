"""Working scale: cloak a large face on an area-averaged copy of its photo, then bring the change up.

Face models read a face through a chip of 112-224 pixels. A face several times larger than that is
area-averaged before any model sees it, so what a cloak changes finer than that is averaged away
before it can move an embedding, while every step of the optimisation (the simulated upload, the
DSSIM penalty, the per-pixel limits) still costs the face's full pixel count. A 900-pixel face on
a 7.7 MP photo took 44 s at native resolution with three models, and fell shorter than the same
face at 181 pixels. So a face over `MIN_WORKING_FACTOR` x `WORKING_FACE_PX` wide is cloaked on its
photo area-averaged until the face is `WORKING_FACE_PX` wide (never coarser than an attacked model
reads it), and the change found there is upsampled (bilinear) onto the native photo. Smaller faces,
every sample and LFW face among them, keep their native resolution: nothing changes for them.

Pure functions over tensors; `facecloak.cloak.base.Cloak` decides when to use them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from facecloak.align import affine_scale
from facecloak.faces import Faces
from facecloak.turns import face_turns

WORKING_FACE_PX = 224
"""The narrowest a face's detection box is made at its working scale: the largest chip of the models
we know (224, the HSE MobileNet's and VGGFace2 ResNets' crop of the box and a margin), so a model
we do not attack, reading as finely as those, still reads about a working pixel per chip pixel."""

MIN_WORKING_FACTOR = math.sqrt(2.0)
"""Faces that could be averaged by less keep their native resolution: under half the pixels saved is
not worth a resampling of the change."""


def working_factors(faces: Faces, alignments: Sequence[Tensor]) -> Tensor:
    """(N,) how much each face's photo may be area-averaged before the cloak works on it.

    The largest factor that leaves the face's box at least `WORKING_FACE_PX` wide and every model
    in ``alignments`` (per model, (N, 2, 3) chip_from_image) at least one working pixel per chip
    pixel; 1 where that is under `MIN_WORKING_FACTOR`. A face lying on its side
    (`facecloak.turns.face_turns`) is as wide as its box is tall: its box's width (the face's
    height) made it averaged more than the same face upright, to under `WORKING_FACE_PX` across.
    """
    sides = (faces.boxes[:, 2:] - faces.boxes[:, :2]).double().cpu()
    width = torch.where(face_turns(faces.landmarks) % 2 == 1, sides[:, 1], sides[:, 0])
    limit = width / WORKING_FACE_PX
    for matrix in alignments:
        limit = torch.minimum(limit, 1.0 / affine_scale(matrix.double().cpu()))
    return torch.where(limit >= MIN_WORKING_FACTOR, limit, torch.ones_like(limit))


def area_average(photo: Tensor, factor: float) -> Tensor:
    """``photo`` (3, H, W) area-averaged to (3, round(H / factor), round(W / factor))."""
    if factor <= 1:
        return photo
    height, width = photo.shape[-2:]
    size = (max(1, round(height / factor)), max(1, round(width / factor)))
    return F.interpolate(photo[None], size=size, mode="area")[0]


def upsample_change(
    change: Tensor, scale: tuple[float, float], size: tuple[int, int]
) -> tuple[Tensor, int, int]:
    """A working photo's change (3, h, w), zero outside its faces, brought to its native ``size`` (H, W).

    ``scale``: working pixels per native pixel along y and x (h / H, w / W). Only the rectangle
    that holds every changed pixel (a pixel wider, so the change fades to 0 at its edge) is
    sampled, bilinearly, with pixel centres where `area_average` put them. Returns the native
    change over that rectangle and its top-left corner (y, x) in the native photo.
    """
    changed = change.abs().amax(0) > 0
    rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
    y0, y1 = max(0, int(rows[0]) - 1), min(change.shape[-2], int(rows[-1]) + 2)
    x0, x1 = max(0, int(cols[0]) - 1), min(change.shape[-1], int(cols[-1]) + 2)
    sy, sx = scale
    top, left = int(math.floor(y0 / sy)), int(math.floor(x0 / sx))
    bottom, right = min(size[0], int(math.ceil(y1 / sy))), min(size[1], int(math.ceil(x1 / sx)))
    part = change[None, :, y0:y1, x0:x1]

    def axis(start: int, stop: int, step: float, first: int, count: int) -> Tensor:
        # native pixel centre -> working coordinate -> grid_sample's [-1, 1] over the part
        working = (torch.arange(start, stop, dtype=torch.float64) + 0.5) * step - 0.5 - first
        return (2.0 * working / max(count - 1, 1) - 1.0).to(change)

    gy = axis(top, bottom, sy, y0, y1 - y0)
    gx = axis(left, right, sx, x0, x1 - x0)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    native = F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    return native, top, left


@dataclass(frozen=True)
class WorkingPhotos:
    """The photos a cloak works on: each original at every factor its faces need.

    Attributes:
        photos: the working photos (an original itself where its factor is 1).
        faces: the faces, in their original order, in working-photo coordinates
            (``image_index`` into ``photos``).
        sources: (W,) the original each working photo comes from.
        factors: (W,) the factor it was area-averaged by.
    """

    photos: list[Tensor]
    faces: Faces
    sources: Tensor
    factors: Tensor

    @property
    def native(self) -> bool:
        """No face is worked on below its native resolution."""
        return bool((self.factors <= 1).all())

    def to_native(
        self, originals: Sequence[Tensor], cloaked: Sequence[Tensor], stored: Callable[[Tensor], Tensor]
    ) -> list[Tensor]:
        """The originals with the cloak's changes, as ``stored`` (rounding to 8 bits) writes them.

        ``cloaked``: each working photo as the cloak left it (stored). An original worked on at
        its own resolution is its cloaked working photo; one with none is ``stored(original)``.
        An area-averaged working photo's change is upsampled (`upsample_change`), added to that,
        clamped and stored again.
        """
        out: list[Tensor | None] = [None] * len(originals)
        for w, factor in enumerate(self.factors.tolist()):
            if factor == 1:
                out[int(self.sources[w])] = cloaked[w]
        out = [image if image is not None else stored(original) for image, original in zip(out, originals)]
        averaged = {int(i) for i, factor in zip(self.sources, self.factors) if factor > 1}
        out = [image.clone() if i in averaged else image for i, image in enumerate(out)]
        for w, (work, result) in enumerate(zip(self.photos, cloaked)):
            i = int(self.sources[w])
            change = result - work
            if self.factors[w] == 1 or not bool((change != 0).any()):
                continue
            height, width = originals[i].shape[-2:]
            scale = (work.shape[-2] / height, work.shape[-1] / width)
            part, top, left = upsample_change(change, scale, (height, width))
            bottom, right = top + part.shape[-2], left + part.shape[-1]
            out[i][:, top:bottom, left:right] = stored((out[i][:, top:bottom, left:right] + part).clamp(0, 1))
        return out


def working_photos(
    photos: Sequence[Tensor],
    faces: Faces,
    factors: Tensor,
    *,
    stored: Callable[[Tensor], Tensor] | None = None,
) -> WorkingPhotos:
    """One working photo per (original, factor) its faces need, and the faces moved onto them.

    ``stored``: applied to every area-averaged copy (e.g. rounding to 8 bits, so the cloak's change
    is measured against pixels as they would be stored); originals are used as they are.
    """
    keys: dict[tuple[int, float], int] = {}
    images, sources, scales = [], [], []
    index = torch.empty(len(faces), dtype=torch.long)
    per_face = torch.ones(len(faces), 2, dtype=torch.float64)  # working pixels per native pixel (x, y)
    for n, (i, factor) in enumerate(zip(faces.image_index.tolist(), factors.tolist())):
        key = (int(i), float(factor))
        if key not in keys:
            keys[key] = len(images)
            copy = area_average(photos[key[0]], key[1])
            images.append(stored(copy) if stored is not None and key[1] > 1 else copy)
            sources.append(key[0])
            scales.append(key[1])
        index[n] = keys[key]
        work, original = images[index[n]], photos[key[0]]
        per_face[n] = torch.tensor([work.shape[-1] / original.shape[-1], work.shape[-2] / original.shape[-2]])
    per_face = per_face.to(faces.boxes)
    moved = Faces(
        faces.boxes * per_face.repeat(1, 2),
        faces.landmarks * per_face[:, None, :],
        faces.scores,
        index.to(faces.image_index),
    )
    return WorkingPhotos(
        images, moved, torch.tensor(sources, dtype=torch.long), torch.tensor(scales, dtype=torch.float64)
    )
