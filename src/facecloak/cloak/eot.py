"""Expectation over transformations: random, differentiable versions of what a scraper does to a photo.

Each draw re-compresses the face crops as JPEG at a random quality, sometimes downscales and
re-upscales them or blurs them slightly, and moves the landmarks a little (a scraper's detector
and aligner are not ours). Optimising the cloak through many such draws makes it survive them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from facecloak import transforms

ROBUSTNESS = ("jpeg", "resize", "blur", "landmarks")


@dataclass(frozen=True)
class UploadSimulator:
    """Random upload transformations for a batch of face crops.

    Attributes:
        robust_to: which of "jpeg", "resize", "blur", "landmarks" to simulate.
        jpeg_quality: range of JPEG qualities drawn per face.
        jpeg_probability: share of draws that re-compress (the rest keep the exact pixels).
        resize_scale: range of downscale factors (then back up).
        resize_probability: share of draws that rescale.
        blur_sigma: range of Gaussian blur sigmas, in pixels.
        blur_probability: share of draws that blur.
        landmark_jitter: standard deviation of landmark noise, as a fraction of the eye distance.
    """

    robust_to: tuple[str, ...] = ROBUSTNESS
    jpeg_quality: tuple[float, float] = (55.0, 95.0)
    jpeg_probability: float = 0.8
    resize_scale: tuple[float, float] = (0.5, 0.9)
    resize_probability: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.0)
    blur_probability: float = 0.2
    landmark_jitter: float = 0.03

    def __call__(self, crops: Tensor, landmarks: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One random draw: transformed (n, 3, h, w) crops and jittered (n, 5, 2) landmarks."""
        n = crops.shape[0]
        uniform = lambda: float(torch.rand((), generator=generator))  # noqa: E731
        out = crops
        if "resize" in self.robust_to and uniform() < self.resize_probability:
            low, high = self.resize_scale
            out = transforms.resize_roundtrip(out, low + (high - low) * uniform())
        if "blur" in self.robust_to and uniform() < self.blur_probability:
            low, high = self.blur_sigma
            out = transforms.gaussian_blur(out, low + (high - low) * uniform())
        if "jpeg" in self.robust_to and uniform() < self.jpeg_probability:
            low, high = self.jpeg_quality
            quality = low + (high - low) * torch.rand(n, generator=generator)
            out = transforms.jpeg_compress(out, quality.round().to(out))
        moved = landmarks
        if "landmarks" in self.robust_to and self.landmark_jitter > 0:
            eye_distance = (landmarks[:, 1] - landmarks[:, 0]).norm(dim=-1).clamp_min(1.0)
            noise = torch.randn(landmarks.shape, generator=generator).to(landmarks)
            moved = landmarks + noise * (self.landmark_jitter * eye_distance)[:, None, None]
        return out, moved

    def max_jitter_px(self, landmarks: Tensor) -> Tensor:
        """(n,) a generous bound on landmark movement, to size the crops."""
        if "landmarks" not in self.robust_to:
            return torch.zeros(landmarks.shape[0])
        eye_distance = (landmarks[:, 1] - landmarks[:, 0]).norm(dim=-1)
        return 3.0 * self.landmark_jitter * eye_distance.cpu()
