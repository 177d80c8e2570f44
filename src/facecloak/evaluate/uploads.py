"""What an upload site may do to a photo before the scraper sees it: one evaluation row each."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from facecloak import io, transforms

THUMBNAIL_JPEG_QUALITY = 85
"""``downscale0.5`` stores the halved photo as JPEG at this quality, as a thumbnailer does."""

UPLOAD_BLUR_SIGMA_PX = 1.0

ADAPTIVE_UPLOAD = "jpeg75"
"""How the adaptive attacker's own protected photos reach it, as the scraper collects them."""


def _downscale_half(image: Tensor) -> Tensor:
    half = (max(1, image.shape[-2] // 2), max(1, image.shape[-1] // 2))
    return torch.nn.functional.interpolate(image[None], size=half, mode="area")[0]


UPLOADS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda image: image,
    "jpeg95": lambda image: io.jpeg_roundtrip(image, 95),
    "jpeg75": lambda image: io.jpeg_roundtrip(image, 75),
    "jpeg50": lambda image: io.jpeg_roundtrip(image, 50),
    "downscale0.5": lambda image: io.jpeg_roundtrip(_downscale_half(image), THUMBNAIL_JPEG_QUALITY),
    "blur": lambda image: transforms.gaussian_blur(image[None], UPLOAD_BLUR_SIGMA_PX)[0],
}
"""Upload transforms by name (``facecloak evaluate --uploads``)."""

DEFAULT_UPLOADS = ("none", "jpeg95", "jpeg75", "jpeg50", "downscale0.5", "blur")
"""Every upload transform: the rows an evaluation reports unless told otherwise."""
