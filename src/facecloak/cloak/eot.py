"""Expectation over transformations: random, differentiable versions of what a scraper does to a photo.

Each draw re-compresses the face crops as JPEG at a random quality, sometimes downscales and
re-upscales them or blurs them slightly, and moves the landmarks a little (a scraper's detector
and aligner are not ours). Optimising the cloak through many such draws makes it survive them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from facecloak import transforms

ROBUSTNESS = ("jpeg", "resize", "blur", "landmarks", "flip")


@dataclass(frozen=True)
class UploadSimulator:
    """Random upload transformations for a batch of face crops.

    Attributes:
        robust_to: which of "jpeg", "resize", "blur", "landmarks", "flip" to simulate ("flip":
            scrapers that average a face with its mirror image; see `facecloak.embed`).
        jpeg_quality: range of JPEG qualities drawn per face.
        jpeg_probability: share of draws that re-compress (the rest keep the exact pixels).
        resize_scale: range of downscale factors (then back up).
        resize_probability: share of draws that rescale.
        blur_sigma: range of Gaussian blur sigmas, in pixels.
        blur_probability: share of draws that blur.
        shift: standard deviation of the chip's shift, as a fraction of its side ("landmarks":
            a scraper's detector and aligner put the chip a little elsewhere).
        rotation_degrees: standard deviation of the chip's rotation.
        scale: standard deviation of the chip's relative scale.
        diversity: share of draws (per face) whose chip is also zoomed by a factor drawn from
            ``diversity_zoom`` and shifted by up to ``diversity_shift`` of its side (input
            diversity: a change that only works on one exact crop does not transfer).
        diversity_zoom: range of the input-diversity zoom.
        diversity_shift: largest input-diversity shift, as a fraction of the chip's side.
    """

    robust_to: tuple[str, ...] = ROBUSTNESS
    jpeg_quality: tuple[float, float] = (55.0, 95.0)
    jpeg_probability: float = 0.8
    resize_scale: tuple[float, float] = (0.5, 0.9)
    resize_probability: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.0)
    blur_probability: float = 0.2
    shift: float = 0.012
    rotation_degrees: float = 2.0
    scale: float = 0.02
    diversity: float = 0.0
    diversity_zoom: tuple[float, float] = (0.9, 1.1)
    diversity_shift: float = 0.05

    def transform_pixels(self, crops: Tensor, generator: torch.Generator, *, copies: int = 1) -> Tensor:
        """One random draw of the pixel transformations of (n, 3, h, w) crops.

        ``copies``: the crops are that many versions of the same n / copies faces, stacked (a
        cloaked face and its clean original, for the intermediate-feature loss): each face's
        versions go through the same upload, so they differ only by what was given.
        """
        n = crops.shape[0]
        if n % copies:
            raise ValueError(f"{n} crops are not {copies} stacked copies of the same faces")
        out = crops
        if "resize" in self.robust_to and _uniform(generator) < self.resize_probability:
            low, high = self.resize_scale
            out = transforms.resize_roundtrip(out, low + (high - low) * _uniform(generator))
        if "blur" in self.robust_to and _uniform(generator) < self.blur_probability:
            low, high = self.blur_sigma
            out = transforms.gaussian_blur(out, low + (high - low) * _uniform(generator))
        if "jpeg" in self.robust_to and _uniform(generator) < self.jpeg_probability:
            low, high = self.jpeg_quality
            quality = (low + (high - low) * torch.rand(n // copies, generator=generator)).repeat(copies)
            out = transforms.jpeg_compress(out, quality.round().to(out))
        return out

    def jitter_alignment(self, chip_from_source: Tensor, size: int, generator: torch.Generator) -> Tensor:
        """(n, 2, 3) alignments moved by a random small similarity about the chip's centre."""
        jitter = "landmarks" in self.robust_to
        if not jitter and self.diversity <= 0:
            return chip_from_source
        n = chip_from_source.shape[0]
        noise = torch.randn(n, 4, generator=generator, dtype=torch.float64) * float(jitter)
        angle = noise[:, 0] * math.radians(self.rotation_degrees)
        factor = torch.exp(noise[:, 1] * self.scale)
        shift = noise[:, 2:] * self.shift * size
        if self.diversity > 0:
            chosen = (torch.rand(n, generator=generator, dtype=torch.float64) < self.diversity).double()
            low, high = self.diversity_zoom
            zoom = low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)
            offset = (
                2 * torch.rand(n, 2, generator=generator, dtype=torch.float64) - 1
            ) * self.diversity_shift
            factor = factor * (1 + chosen * (zoom - 1))
            shift = shift + chosen[:, None] * offset * size
        cos, sin = torch.cos(angle) * factor, torch.sin(angle) * factor
        linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
        centre = torch.full((n, 2), (size - 1) / 2.0, dtype=torch.float64)
        offset = centre - (linear @ centre[:, :, None])[:, :, 0] + shift
        matrix = chip_from_source.double().cpu()  # the draws are made on the CPU (same on every device)
        moved = torch.cat(
            [linear @ matrix[:, :, :2], (linear @ matrix[:, :, 2:]) + offset[:, :, None]], dim=2
        )
        return moved.to(chip_from_source)


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))
