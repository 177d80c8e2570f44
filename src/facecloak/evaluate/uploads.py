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


UPLOAD_JPEG_QUALITY: dict[str, int] = {
    "jpeg95": 95,
    "jpeg75": 75,
    "jpeg50": 50,
    "downscale0.5": THUMBNAIL_JPEG_QUALITY,
}
"""The JPEG quality each re-encoding upload stores the photo at (the others store no JPEG)."""

UPLOADS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda image: image,
    "jpeg95": lambda image: io.jpeg_roundtrip(image, UPLOAD_JPEG_QUALITY["jpeg95"]),
    "jpeg75": lambda image: io.jpeg_roundtrip(image, UPLOAD_JPEG_QUALITY["jpeg75"]),
    "jpeg50": lambda image: io.jpeg_roundtrip(image, UPLOAD_JPEG_QUALITY["jpeg50"]),
    "downscale0.5": lambda image: io.jpeg_roundtrip(
        _downscale_half(image), UPLOAD_JPEG_QUALITY["downscale0.5"]
    ),
    "blur": lambda image: transforms.gaussian_blur(image[None], UPLOAD_BLUR_SIGMA_PX)[0],
}
"""Upload transforms by name (``facecloak evaluate --uploads``)."""

DEFAULT_UPLOADS = ("none", "jpeg95", "jpeg75", "jpeg50", "downscale0.5", "blur")
"""Every upload transform: the rows an evaluation reports unless told otherwise."""

UPLOAD_DESCRIPTIONS: dict[str, str] = {
    "none": "the protected photo as the protection gave it (no re-encode)",
    **{name: f"JPEG quality {UPLOAD_JPEG_QUALITY[name]}" for name in ("jpeg95", "jpeg75", "jpeg50")},
    "downscale0.5": f"halved in each side (area), then JPEG quality {UPLOAD_JPEG_QUALITY['downscale0.5']}",
    "blur": f"Gaussian blur of sigma {UPLOAD_BLUR_SIGMA_PX:g} px (no re-encode)",
}
"""What each upload transform does, in words, for the report: a row's name alone did not say
that ``downscale0.5`` re-encodes as JPEG too, nor at which quality."""
