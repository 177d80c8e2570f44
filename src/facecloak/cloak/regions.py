"""The pixels a cloak may change: one crop per face, at native resolution, with its feathered mask.

A cloak never touches a whole photo: each face owns the crop its models' chips can read (plus a
margin for landmark jitter), aligned to the 16-pixel JPEG grid of the photo so that simulated
JPEG blocks fall where a real encoder's would. Crops are stacked into buckets of equal padded
size (faces needing the same antialiasing factor per model), so every step is a handful of
batched tensor operations whatever the number of photos and their sizes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from facecloak.align import (
    affine_scale,
    chip_footprint,
    pool_factor,
    pool_sources,
    shift_affine,
    warp_to_chips,
)
from facecloak.faces import Faces, face_regions, region_mask
from facecloak.models.registry import Embedder

JPEG_GRID_PX = 16
"""Crops start on multiples of this (a JPEG MCU with 4:2:0 chroma subsampling)."""

MAX_BUCKET_FACES = 8
"""Faces per bucket on the CPU; `GPU_BUCKET_FACES` on a GPU. Each step runs a bucket's faces
through the models as one batch, and on 2 CPU cores a batch's cost per face grows with its size
once its activations outgrow the caches: 48 LFW faces in one call, three models, `low`, took
2.84 s a face in buckets of 64, 0.90 in buckets of 8, 0.97 in buckets of 4 (2026-12-06)."""

GPU_BUCKET_FACES = 512
"""Faces per bucket on a GPU: fewer, larger batches per step keep it busy instead of waiting on
kernel launches (a 256-photo chunk of one-face photos was 5 buckets a step at 64)."""

JITTER_MARGIN = 0.12
"""Border around each chip, as a fraction of its side, that jittered alignments may read."""


@dataclass
class Bucket:
    """Faces whose crops are stacked into one padded batch.

    Attributes:
        faces: (n,) indices into the cloak's face list.
        crops: (n, 3, h, w) clean pixels, zero-padded at the bottom/right.
        masks: (n, 1, h, w) feathered face-region masks (0 on padding and outside the region).
        origins: (n, 2) image pixel of each crop's top-left corner (x0, y0).
        sizes: (n, 2) valid crop width and height.
        chip_from_crop: per model, (n, 2, 3) maps from crop pixels to that model's chip.
        factors: per model, the area-averaging factor used before sampling its chips.
    """

    faces: Tensor
    crops: Tensor
    masks: Tensor
    origins: Tensor
    sizes: Tensor
    chip_from_crop: list[Tensor]
    factors: tuple[int, ...]


def build_buckets(
    images: Sequence[Tensor],
    faces: Faces,
    models: Sequence[Embedder],
    chip_from_image: Sequence[Tensor],
    *,
    region_scale: float,
    feather: float,
    jitter_margin: float = JITTER_MARGIN,
    max_faces: int = MAX_BUCKET_FACES,
) -> list[Bucket]:
    """Cut one crop per face covering every model's chip, pad and stack them into buckets.

    Args:
        images: the photos, (3, H_i, W_i) each.
        faces: the faces to cloak (``image_index`` into ``images``).
        models: the embedders whose chips the crop must cover.
        chip_from_image: per model, (N, 2, 3) its alignment of every face.
        region_scale: face region size relative to the detection box (the only pixels changed).
        feather: soft edge of the region, as a fraction of its half-size.
        jitter_margin: extra border around each chip, as a fraction of its side, that random
            alignment jitter may read.
        max_faces: most faces per bucket.
    """
    regions = face_regions(faces, region_scale)
    boxes, keys = [], []
    for n in range(len(faces)):
        image = images[int(faces.image_index[n])]
        height, width = image.shape[-2:]
        low, high = regions[n, :2].clone(), regions[n, 2:].clone()
        factors = []
        for model, matrices in zip(models, chip_from_image):
            size = model.card.input_size
            matrix = matrices[n : n + 1].double()
            factor = pool_factor(float(affine_scale(matrix)[0]))
            factors.append(factor)
            pixels_per_chip = 1.0 / float(affine_scale(matrix)[0])
            footprint = chip_footprint(
                matrix, size, margin=jitter_margin * size * pixels_per_chip + 2 * factor
            )[0]
            low = torch.minimum(low, footprint[:2].float())
            high = torch.maximum(high, footprint[2:].float())
        x0 = max(0, int(math.floor(float(low[0]))) // JPEG_GRID_PX * JPEG_GRID_PX)
        y0 = max(0, int(math.floor(float(low[1]))) // JPEG_GRID_PX * JPEG_GRID_PX)
        x1 = min(width, int(math.ceil(float(high[0]))) + 1)
        y1 = min(height, int(math.ceil(float(high[1]))) + 1)
        boxes.append((x0, y0, x1, y1))
        keys.append(tuple(factors))
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for n, key in enumerate(keys):
        groups[key].append(n)
    buckets = []
    for key, members in groups.items():
        members.sort(key=lambda n: (boxes[n][2] - boxes[n][0]) * (boxes[n][3] - boxes[n][1]))
        for start in range(0, len(members), max_faces):
            chunk = members[start : start + max_faces]
            buckets.append(_stack(images, faces, regions, boxes, chunk, key, feather, chip_from_image))
    return buckets


def _stack(images, faces, regions, boxes, members, factors, feather, chip_from_image) -> Bucket:
    height = max(boxes[n][3] - boxes[n][1] for n in members)
    width = max(boxes[n][2] - boxes[n][0] for n in members)
    reference = images[int(faces.image_index[members[0]])]
    crops = reference.new_zeros(len(members), 3, height, width)
    masks = reference.new_zeros(len(members), 1, height, width)
    for row, n in enumerate(members):
        x0, y0, x1, y1 = boxes[n]
        image = images[int(faces.image_index[n])]
        crops[row, :, : y1 - y0, : x1 - x0] = image[:, y0:y1, x0:x1]
        region = regions[n].to(reference)
        masks[row, :, : y1 - y0, : x1 - x0] = region_mask(
            region, x0, y0, y1 - y0, x1 - x0, "ellipse", feather
        )
    index = torch.tensor(members, dtype=torch.long)
    origins = torch.tensor([boxes[n][:2] for n in members], dtype=torch.float32)
    sizes = torch.tensor([(boxes[n][2] - boxes[n][0], boxes[n][3] - boxes[n][1]) for n in members])
    to_crop = [
        shift_affine(matrices[index].double(), origins[:, 0].double(), origins[:, 1].double()).to(reference)
        for matrices in chip_from_image
    ]
    return Bucket(index, crops, masks, origins, sizes, to_crop, tuple(factors))


def sample_chips(crops: Tensor, chip_from_crop: Tensor, model: Embedder, factor: int) -> Tensor:
    """Aligned chips for ``model`` from (n, 3, h, w) crops, differentiable w.r.t. the crops.

    Args:
        crops: (n, 3, h, w) crop pixels (perturbed and transformed as the caller wishes).
        chip_from_crop: (n, 2, 3) maps from crop pixels to the model's chip.
        model: the embedder (its card gives the chip size).
        factor: area-averaging factor for this model's bucket.
    """
    sources, chip_from_source = pool_sources(crops, chip_from_crop.to(crops), factor)
    return warp_to_chips(sources, chip_from_source, model.card.input_size)


def paste_perturbations(
    images: Sequence[Tensor],
    faces: Faces,
    buckets: Sequence[Bucket],
    deltas: Sequence[Tensor],
    *,
    unchanged: Sequence[Tensor] | None = None,
    finish: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """Add each face's masked perturbation back into its photo; clamp to [0, 1].

    Where two faces' crops overlap, their perturbations add, in bucket and row order, but no pixel
    changes more than the larger of its faces' own changes there: each face's change is inside its
    per-pixel allowance (JND, L-infinity), and their plain sum was not (18/255 against `mid`'s cap
    of 16 where two LFW faces' regions met). Only the face crops are computed, each after the
    other: outside them an output is ``unchanged[i]`` (default: ``images[i]`` clamped), so a 12 MP
    photo is not copied, summed and clamped whole. ``finish`` is applied to each clamped crop
    (e.g. rounding to 8 bits as stored, with ``unchanged`` the photos rounded once), as it would
    be to the whole photo.
    """
    areas = defaultdict(list)  # per photo: (x0, y0, x1, y1, change), in the order the changes add up
    for bucket, delta in zip(buckets, deltas):
        change = bucket.masks * delta
        for row, n in enumerate(bucket.faces.tolist()):
            x0, y0 = (int(v) for v in bucket.origins[row].tolist())
            width, height = (int(v) for v in bucket.sizes[row].tolist())
            crop = change[row, :, :height, :width]
            areas[int(faces.image_index[n])].append((x0, y0, x0 + width, y0 + height, crop))
    base = unchanged if unchanged is not None else [image.clamp(0, 1) for image in images]
    outputs = [image.clone() for image in base]
    for i, photo_areas in areas.items():
        for x0, y0, x1, y1, _ in photo_areas:
            region = images[i][:, y0:y1, x0:x1].clone()
            total, envelope = torch.zeros_like(region), torch.zeros_like(region)
            for u0, v0, u1, v1, change in photo_areas:
                left, top, right, bottom = max(x0, u0), max(y0, v0), min(x1, u1), min(y1, v1)
                if left < right and top < bottom:
                    part = change[:, top - v0 : bottom - v0, left - u0 : right - u0].to(region)
                    inside = (slice(None), slice(top - y0, bottom - y0), slice(left - x0, right - x0))
                    total[inside] += part
                    envelope[inside] = torch.maximum(envelope[inside], part.abs())
            region = (region + torch.maximum(torch.minimum(total, envelope), -envelope)).clamp_(0, 1)
            outputs[i][:, y0:y1, x0:x1] = finish(region) if finish is not None else region
    return outputs
