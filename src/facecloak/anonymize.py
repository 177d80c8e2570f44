"""Anonymising faces: blur, pixelate or mask each face region at full resolution.

Each face's region is its detection box scaled by ``scale`` about its centre (deface uses 1.3),
as an ellipse or a box with a soft edge ``feather`` wide. Only pixels inside a region change:
the mask is exactly zero outside it and the untouched pixels are copied, not recomputed, so a
lossless output is byte-identical there. Everything is torch ops, on the GPU when the images are.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facecloak import transforms
from facecloak._checks import check_choice, check_faces, check_images, is_whole_number
from facecloak.defaults import MAX_BLOCKS, MAX_FEATHER, MIN_SCALE, MIN_STRENGTH, REGION_SCALE
from facecloak.errors import InvalidInputError
from facecloak.faces import Faces, check_face_values, face_regions, region_mask

METHODS = ("blur", "pixelate", "mask", "replace")
SHAPES = ("ellipse", "box")

MIN_BLOCK_PX = 5.0
"""Smallest mosaic block, in pixels. With 8 blocks, faces of 17 to 30 px (2 to 4 px blocks) left
3 or 4 of 8 LFW faces matching their clean selves after JPEG 75 on dlib-resnet (0.52 to 0.56);
with 5 px blocks at most one, at 0.58 to 0.59, about where a solid mask of it lies. A mosaic of
a face of 5 x ``blocks`` px or more is unchanged by it."""


def _apply_per_face(
    images: Tensor, faces: Faces, scale: float, shape: str, feather: float, filter_crop
) -> Tensor:
    """Blend ``filter_crop(crop, face_side)`` into each face region; other pixels are copied untouched."""
    check_images(images)
    check_face_values(check_faces(faces, images.shape[0]), [images.shape[-2:]] * images.shape[0])
    check_choice(shape, SHAPES, "shape")
    check_strength_settings(scale=scale, feather=feather)
    output = images.clone()
    height, width = images.shape[-2:]
    # the mask is the whole region's shape, the crop its part inside the photo: a face cut off by
    # the photo's edge is covered up to that edge (a shape fitted to the clipped box was not: its
    # centre moved inwards and left a strip of the face at the edge untouched)
    regions = face_regions(faces.to(images.device), scale)
    # a region past float range had a NaN centre, and no pixel changed
    if not bool(torch.isfinite(regions).all()):
        raise InvalidInputError(f"the region scale {scale} makes a face's region larger than any number")
    corners = face_regions(faces.to(images.device), scale, (height, width)).tolist()
    sides = torch.minimum(faces.boxes[:, 2] - faces.boxes[:, 0], faces.boxes[:, 3] - faces.boxes[:, 1])
    for n, (image_index, side) in enumerate(zip(faces.image_index.tolist(), sides.tolist())):
        left, top, right, bottom = corners[n]
        x0, y0 = int(math.floor(left)), int(math.floor(top))
        x1, y1 = int(math.ceil(right)) + 1, int(math.ceil(bottom)) + 1
        if x1 <= x0 or y1 <= y0:  # a photo one pixel thin is a region one pixel thin, not none
            continue
        crop = output[image_index : image_index + 1, :, y0:y1, x0:x1]
        mask = region_mask(regions[n], x0, y0, y1 - y0, x1 - x0, shape, feather)
        filtered = filter_crop(crop, max(side, 1.0))
        blended = torch.where(mask > 0, crop * (1 - mask) + filtered * mask, crop)
        output[image_index, :, y0:y1, x0:x1] = blended[0]
    return output


def blur_faces(
    images: Tensor,
    faces: Faces,
    *,
    strength: float = 0.25,
    scale: float = REGION_SCALE,
    shape: str = "ellipse",
    feather: float = 0.15,
) -> Tensor:
    """Gaussian-blur every face, with sigma = ``strength`` x the face's size.

    Args:
        images: (B, 3, H, W) in [0, 1].
        faces: the faces to blur.
        strength: sigma as a fraction of the face's shorter box side. 0.25 leaves no identity a
            recognition model can match (see tests); lower keeps more of the face's look.
        scale: region size relative to the detection box.
        shape: "ellipse" or "box".
        feather: soft edge, as a fraction of the region's half-size.

    Returns:
        (B, 3, H, W): the images with faces blurred; all other pixels identical.

    Example:
        >>> out = blur_faces(images, detect_faces(images))  # doctest: +SKIP
    """
    check_strength_settings(strength=strength)

    def blur(crop: Tensor, side: float) -> Tensor:
        return transforms.downscaled_gaussian_blur(crop, strength * side)

    return _apply_per_face(images, faces, scale, shape, feather, blur)


def pixelate_faces(
    images: Tensor,
    faces: Faces,
    *,
    blocks: int = 8,
    scale: float = REGION_SCALE,
    shape: str = "ellipse",
    feather: float = 0.0,
) -> Tensor:
    """Replace every face by a mosaic of about ``blocks`` blocks across the face's box.

    Blocks are at least `MIN_BLOCK_PX` wide, so a face under 5 x ``blocks`` px gets fewer.

    Fewer blocks hide more; at 8 blocks a face's identity is gone for a recognition model, while
    10 left 1 of 24 LFW faces matching and 12 left 5 (`MAX_BLOCKS`; mosaics are known to be partly
    reversible).
    """
    check_strength_settings(blocks=blocks)

    def mosaic(crop: Tensor, side: float) -> Tensor:
        # at least `MIN_BLOCK_PX`: a face of ``blocks`` pixels or fewer got 1 px blocks, itself
        # unchanged, and one of 20 to 40 px got 2 to 4 px blocks that a recognition model matched
        block_px = max(MIN_BLOCK_PX, side / blocks)
        rows = max(1, round(crop.shape[-2] / block_px))
        cols = max(1, round(crop.shape[-1] / block_px))
        small = F.adaptive_avg_pool2d(crop, (rows, cols))
        return F.interpolate(small, size=crop.shape[-2:], mode="nearest")

    return _apply_per_face(images, faces, scale, shape, feather, mosaic)


def mask_faces(
    images: Tensor,
    faces: Faces,
    *,
    color: tuple[float, float, float] = (0.0, 0.0, 0.0),
    scale: float = REGION_SCALE,
    shape: str = "ellipse",
    feather: float = 0.0,
) -> Tensor:
    """Cover every face with a solid ``color`` (RGB in [0, 1])."""
    check_images(images)  # before the fill is made from their dtype (a list failed on .dtype)
    check_mask_color(color)
    fill = torch.tensor(color, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return _apply_per_face(images, faces, scale, shape, feather, lambda crop, side: fill.expand_as(crop))


def check_mask_color(color: object) -> None:
    """Refuse a ``mask_faces`` fill that is not three numbers in [0, 1].

    255 wrote pixels far outside the images' range (every later stage refuses them), NaN painted
    the faces NaN, two numbers failed with a reshape error.
    """
    try:
        values = [] if isinstance(color, (str, bytes)) else [float(v) for v in color]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(0 <= v <= 1 for v in values):  # NaN fails both comparisons
        raise InvalidInputError(f"color must be three numbers (R, G, B) in [0, 1], got {color!r}")


def _replace(images: Tensor, faces: Faces, *, bank, **params) -> Tensor:
    """Replace every face with a verified donor mix (`facecloak.replace.replace_faces`), images only.

    Use `facecloak.replace.replace_faces` to also get which faces passed the verification.
    """
    from facecloak.replace import replace_faces

    return torch.stack(replace_faces(images, faces, bank, **params).images)


_FUNCTIONS = {"blur": blur_faces, "pixelate": pixelate_faces, "mask": mask_faces, "replace": _replace}


def anonymize_faces(images: Tensor, faces: Faces, method: str = "blur", **params) -> Tensor:
    """Anonymise faces with ``method`` ("blur", "pixelate", "mask" or "replace") and its ``params``.

    "replace" takes ``bank=`` (a donor bank or its name) and the keywords of
    `facecloak.replace.replace_faces`.
    """
    check_choice(method, METHODS, "method")
    check_method_params(method, params)
    return _FUNCTIONS[method](images, faces, **params)


def check_method_params(method: str, params: dict) -> None:
    """Refuse keywords ``method`` does not take, and a replace without its bank, in one line.

    They failed as a raw TypeError when the first faces were processed (`Anonymizer` builds before
    a batch starts, so a typo surfaced only photo by photo).
    """
    functions, also = (_FUNCTIONS[method],), set()  # also: keywords that are not keyword-only
    if method == "replace":  # its keywords are the replacer's (`facecloak.replace.replace_faces`)
        if params.get("bank") is None:
            raise InvalidInputError("replace needs bank= (a donor bank or its name: `facecloak donors add`)")
        # a misspelt one (attempts) was a raw TypeError from FaceReplacer at the first photo
        from facecloak.replace import FaceReplacer, replace_faces

        functions, also = (replace_faces, FaceReplacer), {"bank", "models"}
    signature = [
        parameter for function in functions for parameter in inspect.signature(function).parameters.values()
    ]
    accepted = sorted({p.name for p in signature if p.kind is inspect.Parameter.KEYWORD_ONLY} | also)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InvalidInputError(f"{method} takes no {', '.join(unknown)} (it takes {', '.join(accepted)})")


_STRENGTH_SETTINGS = ("strength", "blocks", "scale", "feather")


def check_strength_settings(
    *,
    strength: float | None = None,
    blocks: int | None = None,
    scale: float | None = None,
    feather: float | None = None,
) -> None:
    """Refuse a blur, mosaic, region or edge that leaves a face recognisable (`MIN_STRENGTH` and on).

    Every anonymised face is reported protected, so a setting that leaves a recognition model
    matching it is an error, not an option. None: not given (the method's default holds).
    """
    if feather is not None and not 0 <= feather <= MAX_FEATHER:
        raise InvalidInputError(
            f"feather must be in [0, {MAX_FEATHER}] (a softer edge leaves a recognisable face), got {feather}"
        )
    if scale is not None and not MIN_SCALE <= scale < math.inf:  # an infinite region covered nothing
        raise InvalidInputError(
            f"the region scale must be a finite number >= {MIN_SCALE} (a smaller region leaves a "
            "recognisable face, an infinite one covered none of it), "
            f"got {scale}"
        )
    if strength is not None and not MIN_STRENGTH <= strength < math.inf:
        raise InvalidInputError(
            f"strength must be a finite number >= {MIN_STRENGTH} (a weaker blur leaves a recognisable "
            f"face), got {strength}"
        )
    if blocks is not None and (not is_whole_number(blocks) or not 1 <= blocks <= MAX_BLOCKS):
        raise InvalidInputError(
            f"blocks must be a whole number 1 to {MAX_BLOCKS} (a finer mosaic leaves a recognisable face), "
            f"got {blocks}"
        )


class Anonymizer(nn.Module):
    """``Anonymizer(method, **params)(images, faces)``: the module form CLI and batch use."""

    def __init__(self, method: str = "blur", **params) -> None:
        super().__init__()
        self.method = check_choice(method, METHODS, "method")
        self.params = {key: value for key, value in params.items() if value is not None}
        # refused here, before a batch starts, not photo by photo
        check_method_params(self.method, self.params)
        check_strength_settings(**{k: v for k, v in self.params.items() if k in _STRENGTH_SETTINGS})
        if "color" in self.params:
            check_mask_color(self.params["color"])

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.params.items())
        return f"Anonymizer(method={self.method!r}{', ' if options else ''}{options})"

    def forward(self, images: Tensor, faces: Faces) -> Tensor:
        """Anonymise ``faces`` in (B, 3, H, W) ``images`` (method and keywords checked when built)."""
        return _FUNCTIONS[self.method](images, faces, **self.params)
