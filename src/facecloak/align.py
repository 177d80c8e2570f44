"""Face alignment: five landmarks -> a similarity transform -> an aligned chip, differentiably.

Convention:
    - Coordinates are pixels, ``(x, y)``, integer values at pixel centres: the top-left pixel
      spans [-0.5, 0.5] x [-0.5, 0.5].
    - A matrix named ``chip_from_image`` is (N, 2, 3) and maps homogeneous image pixels to chip
      pixels; ``image_from_chip`` is its inverse.
    - Sampling is bilinear through ``grid_sample(align_corners=False)``, zeros outside the image.

Gradients flow from the chip back to every source pixel it was sampled from, so a cloak can be
optimised at the photo's native resolution through the alignment. A face much larger than the
chip is first area-averaged by an integer factor (dlib shrinks with an image pyramid instead, a
different filter: such chips differ from dlib's by a few grey levels on average) so the
chip is not aliased and the gradient spreads over all the face's pixels instead of a sparse grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from facecloak._checks import check_images
from facecloak.errors import InvalidInputError
from facecloak.faces import Faces
from facecloak.landmarks import model_landmarks
from facecloak.models.registry import FaceModelCard
from facecloak.turns import face_turns, turn_chip_affine


def estimate_similarity(points: Tensor, template: Tensor) -> Tensor:
    """Least-squares similarity (rotation, uniform scale, translation) taking points to template.

    Args:
        points: (N, K, 2) landmarks in image pixels.
        template: (K, 2) or (N, K, 2) target positions in chip pixels.

    Returns:
        chip_from_image: (N, 2, 3).

    Example:
        >>> t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> estimate_similarity(2 * t[None] + 3, t).abs().round(decimals=4)
        tensor([[[0.5000, 0.0000, 1.5000],
                 [0.0000, 0.5000, 1.5000]]])
    """
    if points.ndim != 3 or points.shape[-1] != 2:
        raise InvalidInputError(f"points must be (N, K, 2), got {tuple(points.shape)}")
    if template.shape not in ((points.shape[1], 2), tuple(points.shape)):
        raise InvalidInputError(
            f"template must be ({points.shape[1]}, 2) or {tuple(points.shape)}, got {tuple(template.shape)}"
        )
    if not (bool(torch.isfinite(points).all()) and bool(torch.isfinite(template).all())):
        # a NaN reached LAPACK, which printed its own error and failed an internal assert of torch
        raise InvalidInputError("points and template must hold finite numbers (no NaN or infinity)")
    template = template.to(points).expand_as(points)
    x, y = points[..., 0], points[..., 1]
    u, v = template[..., 0], template[..., 1]
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)
    # u = a x - b y + tx ; v = b x + a y + ty  -> linear in (a, b, tx, ty)
    rows_u = torch.stack([x, -y, ones, zeros], dim=-1)
    rows_v = torch.stack([y, x, zeros, ones], dim=-1)
    design = torch.cat([rows_u, rows_v], dim=1).double()
    target = torch.cat([u, v], dim=1).double().unsqueeze(-1)
    params = torch.linalg.lstsq(design, target).solution.squeeze(-1).to(points.dtype)
    a, b, tx, ty = params.unbind(-1)
    return torch.stack([torch.stack([a, -b, tx], -1), torch.stack([b, a, ty], -1)], dim=1)


def invert_affine(matrix: Tensor) -> Tensor:
    """Inverse of (N, 2, 3) affine maps."""
    linear, shift = matrix[:, :, :2], matrix[:, :, 2:]
    inverse = torch.linalg.inv(linear)
    return torch.cat([inverse, -inverse @ shift], dim=2)


def transform_points(matrix: Tensor, points: Tensor) -> Tensor:
    """Apply (N, 2, 3) affine maps to (N, K, 2) points."""
    return points @ matrix[:, :, :2].transpose(1, 2) + matrix[:, :, 2].unsqueeze(1)


def affine_scale(matrix: Tensor) -> Tensor:
    """(N,) uniform scale of similarity maps (chip pixels per image pixel for ``chip_from_image``)."""
    return torch.linalg.det(matrix[:, :, :2]).abs().sqrt()


def dlib_chip_from_image(points: Tensor, template: Tensor, size: int) -> Tensor:
    """The chip transform dlib's ``get_face_chip_details`` builds from its own landmarks.

    dlib fits the least-squares similarity, keeps only a rectangle and an angle (centre = image of
    the chip centre, width = ``size * scale - 1``) and maps the rectangle's corners to chip pixels
    0 and ``size - 1``. Reproducing that keeps chips within one grey level of dlib's.

    Args:
        points: (N, K, 2) dlib landmarks in image pixels.
        template: (K, 2) where those landmarks go, in chip pixels.
        size: chip side.

    Returns:
        chip_from_image: (N, 2, 3).
    """
    image_from_chip = estimate_similarity(template.to(points).expand_as(points).contiguous(), points)
    scale = affine_scale(image_from_chip)  # image pixels per chip pixel
    angle = torch.atan2(image_from_chip[:, 1, 0], image_from_chip[:, 0, 0])
    half = torch.full_like(scale, size / 2.0)
    centre = transform_points(image_from_chip, torch.stack([half, half], -1)[:, None])[:, 0]
    step = (size * scale - 1.0) / (size - 1.0)  # image pixels between neighbouring chip pixels
    cos, sin = torch.cos(angle) * step, torch.sin(angle) * step
    mid = (size - 1) / 2.0
    tx = centre[:, 0] - (cos * mid - sin * mid)
    ty = centre[:, 1] - (sin * mid + cos * mid)
    image_from_chip = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    return invert_affine(image_from_chip)


def pool_factor(scale: float) -> int:
    """Integer area-averaging factor so that at most about one image pixel feeds each chip pixel."""
    return max(1, int(math.floor(1.0 / max(scale, 1e-6))))


def chip_footprint(chip_from_image: Tensor, size: int, margin: float = 0.0) -> Tensor:
    """(N, 4) integer-valued ``x0, y0, x1, y1`` (x1, y1 exclusive) of the image pixels a chip can read.

    ``margin`` widens the box by that many pixels on every side (for pooling and jitter).
    """
    image_from_chip = invert_affine(chip_from_image.double())
    corners = torch.tensor(
        [[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]], dtype=torch.float64
    ).to(chip_from_image.device)
    points = transform_points(image_from_chip, corners.expand(len(chip_from_image), 4, 2))
    low = torch.floor(points.amin(1) - margin)
    high = torch.ceil(points.amax(1) + margin) + 1
    return torch.cat([low, high], dim=1)


def shift_affine(chip_from_image: Tensor, x0: Tensor | float, y0: Tensor | float) -> Tensor:
    """chip_from_crop for a crop whose top-left pixel is image pixel ``(x0, y0)``."""
    offset = torch.stack([torch.as_tensor(x0), torch.as_tensor(y0)], -1).to(chip_from_image)
    shifted = chip_from_image.clone()
    shifted[..., 2] = chip_from_image[..., 2] + (chip_from_image[..., :2] @ offset.unsqueeze(-1)).squeeze(-1)
    return shifted


def pool_sources(sources: Tensor, chip_from_source: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """Area-average ``sources`` by an integer ``factor`` and adjust chip_from_source to match.

    A pooled pixel j covers source pixels ``j*factor .. j*factor + factor - 1``, its centre at
    ``j*factor + (factor - 1) / 2``.
    """
    if factor <= 1:
        return sources, chip_from_source
    pooled = F.avg_pool2d(sources, factor, ceil_mode=True, count_include_pad=False)
    pooled_from_source = torch.tensor(
        [
            [1.0 / factor, 0.0, -(factor - 1) / (2.0 * factor)],
            [0.0, 1.0 / factor, -(factor - 1) / (2.0 * factor)],
        ],
        dtype=chip_from_source.dtype,
        device=chip_from_source.device,
    )
    source_from_pooled = invert_affine(pooled_from_source[None])[0]
    linear = chip_from_source[..., :2] @ source_from_pooled[:, :2]
    shift = chip_from_source[..., :2] @ source_from_pooled[:, 2:] + chip_from_source[..., 2:]
    return pooled, torch.cat([linear, shift], dim=-1)


def warp_to_chips(sources: Tensor, chip_from_source: Tensor, size: int) -> Tensor:
    """Bilinear-sample (N, 3, size, size) chips, one per source, in a single ``grid_sample``.

    Args:
        sources: (N, C, h, w) images or crops, one per chip.
        chip_from_source: (N, 2, 3) maps from source pixels to chip pixels.
        size: chip side.
    """
    image_from_chip = invert_affine(chip_from_source.double())
    # affine_grid works in normalised coordinates (-1..1 across pixel edges): compose the pixel map
    # with those of the chip and of the source, so one built-in call makes the whole grid
    height, width = sources.shape[-2:]
    to_normalised = image_from_chip.new_tensor([2.0 / width, 2.0 / height]).view(1, 2, 1)
    half, centre = size / 2.0, (size - 1) / 2.0
    linear = to_normalised * image_from_chip[:, :, :2] * half
    shift = to_normalised * (
        image_from_chip[:, :, :2].sum(2, keepdim=True) * centre + image_from_chip[:, :, 2:]
    )
    shift = shift + image_from_chip.new_tensor([1.0 / width - 1.0, 1.0 / height - 1.0]).view(1, 2, 1)
    theta = torch.cat([linear, shift], dim=2).to(sources)  # the sources' dtype and device
    grid = F.affine_grid(theta, [len(sources), sources.shape[1], size, size], align_corners=False)
    return F.grid_sample(sources, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def align_faces(
    images: Tensor, chip_from_image: Tensor, image_index: Tensor, size: int, *, antialias: bool = True
) -> Tensor:
    """Sample one aligned chip per face, differentiably with respect to ``images``.

    Each face reads only the crop its chip covers, so large photos cost no more than small ones.

    Args:
        images: (B, 3, H, W) in [0, 1].
        chip_from_image: (N, 2, 3) affine maps (see the module's convention).
        image_index: (N,) which image each face comes from.
        size: chip side in pixels.
        antialias: area-average faces more than twice the chip's size before sampling.

    Returns:
        chips: (N, 3, size, size).

    Example:
        >>> images = torch.rand(1, 3, 64, 64)
        >>> shift = torch.tensor([[[1.0, 0.0, -8.0], [0.0, 1.0, -8.0]]])
        >>> chips = align_faces(images, shift, torch.tensor([0]), 32)
        >>> torch.allclose(chips[0], images[0, :, 8:40, 8:40], atol=1e-5)
        True
    """
    check_images(images.detach())
    if chip_from_image.ndim != 3 or chip_from_image.shape[1:] != (2, 3):
        raise InvalidInputError(f"chip_from_image must be (N, 2, 3), got {tuple(chip_from_image.shape)}")
    _check_chip_request(chip_from_image, image_index, len(images), size)
    if len(chip_from_image) == 0:
        return images.new_zeros(0, 3, size, size)
    matrices = chip_from_image.to(images)
    factors = [pool_factor(s) if antialias else 1 for s in affine_scale(matrices).tolist()]
    boxes = chip_footprint(matrices, size, margin=2.0 * max(factors)).long().tolist()
    height, width = images.shape[-2:]
    chips = []
    for n, source_index in enumerate(image_index.tolist()):
        x0, y0, x1, y1 = boxes[n]
        factor = factors[n]  # start the crop on the pooling grid, so chips don't depend on the margin
        x0, y0 = max(0, x0 // factor * factor), max(0, y0 // factor * factor)
        x1, y1 = min(width, x1), min(height, y1)
        if x1 <= x0 or y1 <= y0:  # the chip lies entirely outside the image
            chips.append(images.new_zeros(1, 3, size, size))
            continue
        crop = images[source_index : source_index + 1, :, y0:y1, x0:x1]
        sources, chip_from_crop = pool_sources(crop, shift_affine(matrices[n : n + 1], x0, y0), factor)
        chips.append(warp_to_chips(sources, chip_from_crop, size))
    return torch.cat(chips)


def _check_chip_request(chip_from_image: Tensor, image_index: object, num_images: int, size: object) -> None:
    """Refuse what `align_faces` would fail on deep in torch, or answer with the wrong chips.

    An ``image_index`` shorter than the matrices silently gave fewer chips than faces; one out of
    the batch, a NaN or singular matrix, or a size of 0 failed inside ``grid_sample`` or ``inv``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"size must be a positive integer (the chip's side), got {size!r}")
    count = len(chip_from_image)
    if not isinstance(image_index, Tensor) or image_index.shape != (count,):
        got = tuple(image_index.shape) if isinstance(image_index, Tensor) else type(image_index).__name__
        raise InvalidInputError(f"image_index must be a ({count},) tensor, one per matrix; got {got}")
    if image_index.is_floating_point() or image_index.is_complex() or image_index.dtype == torch.bool:
        raise InvalidInputError(f"image_index must hold integers, got {image_index.dtype}")
    if count and (int(image_index.min()) < 0 or int(image_index.max()) >= num_images):
        raise InvalidInputError(f"image_index must lie in [0, {num_images}) for this batch")
    if count and not bool(torch.isfinite(chip_from_image).all()):
        raise InvalidInputError("chip_from_image must hold finite numbers (no NaN or infinity)")
    if count and not bool((torch.linalg.det(chip_from_image[:, :, :2].double()) != 0).all()):
        raise InvalidInputError("chip_from_image must be invertible (a map that squashes the face to a line)")


def box_chip_from_image(boxes: Tensor, image_sizes: Tensor, size: int, margin: float) -> Tensor:
    """(N, 2, 3) chip_from_image of a "box crop": the detection box widened, clipped, resized.

    Some models (e.g. the HSE MobileNet) see no landmark alignment: the detection box grown by
    ``margin`` pixels on every side and clipped to the photo, resized to ``size`` x ``size``
    (generally not square in the photo, so the map scales x and y differently). Pixel edges, as
    in the module's convention: the crop spans ``[left - 0.5, right - 0.5]`` and chip pixel
    ``u`` reads image ``x = left - 0.5 + (u + 0.5) * (right - left) / size``.

    Args:
        boxes: (N, 4) detection boxes ``x0, y0, x1, y1`` in image pixels.
        image_sizes: (N, 2) width and height of each face's photo.
        size: chip side.
        margin: pixels added on every side before clipping.
    """
    boxes = boxes.double()
    limits = image_sizes.to(boxes)
    left = (boxes[:, 0] - margin).clamp_min(0)
    top = (boxes[:, 1] - margin).clamp_min(0)
    right = torch.minimum(boxes[:, 2] + margin, limits[:, 0])
    bottom = torch.minimum(boxes[:, 3] + margin, limits[:, 1])
    sx = size / (right - left).clamp_min(1.0)  # chip pixels per image pixel
    sy = size / (bottom - top).clamp_min(1.0)
    zero = torch.zeros_like(sx)
    return torch.stack(
        [
            torch.stack([sx, zero, (0.5 - left) * sx - 0.5], -1),
            torch.stack([zero, sy, (0.5 - top) * sy - 0.5], -1),
        ],
        1,
    ).float()


def model_alignment(images: Tensor | Sequence[Tensor], faces: Faces, card: FaceModelCard) -> Tensor:
    """(N, 2, 3) chip_from_image of every face, as ``card`` aligns it.

    The one place that knows a model's alignment end to end: landmark-based ("similarity",
    "dlib": the model's own five points, `facecloak.landmarks`, onto its template) or "box" (the
    widened detection box, see `box_chip_from_image`).
    """
    if card.alignment == "box":
        sizes = torch.tensor(
            [tuple(images[int(i)].shape[-1:-3:-1]) for i in faces.image_index.tolist()], dtype=torch.float64
        ).view(-1, 2)
        margin = float(card.extra.get("margin", 0.0))
        matrices = box_chip_from_image(faces.boxes.float().cpu(), sizes, card.input_size, margin)
        turns = face_turns(faces.landmarks)
        if bool((turns != 0).any()):  # a face lying on its side: its box crop turned upright
            matrices = turn_chip_affine(matrices, turns, card.input_size)
        return matrices
    return chip_from_landmarks(model_landmarks(images, faces, card), card)


def chip_from_landmarks(points: Tensor, card: FaceModelCard) -> Tensor:
    """(N, 2, 3) chip_from_image for a model's card from its (N, 5, 2) landmarks (`facecloak.landmarks`)."""
    template = torch.tensor(card.template, dtype=torch.float64)
    if card.alignment == "dlib":
        return dlib_chip_from_image(points.double(), template, card.input_size).float()
    return estimate_similarity(points.double(), template).float()
