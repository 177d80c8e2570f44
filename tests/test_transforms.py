"""Differentiable stand-ins for uploads: blurs on any crop size."""

from __future__ import annotations

import pytest
import torch

from facecloak.transforms import downscaled_gaussian_blur, gaussian_blur


@pytest.mark.parametrize("size", [(5, 200), (200, 2), (1, 50), (2, 50)])
def test_strong_blur_of_a_thin_crop_blurs_and_keeps_its_size(size):
    """A face cut off by the photo's edge leaves a thin crop; blurred with sigma a face's size it
    crashed (a side of zero once downscaled) or was hardly blurred (the kernel cut to the short side)."""
    torch.manual_seed(0)
    crop = torch.rand(1, 3, *size)
    blurred = downscaled_gaussian_blur(crop, 30.0)
    assert blurred.shape == crop.shape
    assert float(blurred.std()) < 0.2 * float(crop.std())


def test_blur_of_a_photo_larger_than_the_kernel_is_unchanged():
    """The usual case keeps its reflect padding: a ramp stays linear inside, a constant stays constant."""
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 48, 64).contiguous()
    blurred = gaussian_blur(ramp, 2.0)
    assert torch.allclose(blurred[..., 10:-10], ramp[..., 10:-10], atol=1e-5)
    assert torch.allclose(gaussian_blur(torch.full((1, 3, 9, 9), 0.5), 1.0), torch.full((1, 3, 9, 9), 0.5))


def test_levels_8bit_refuses_integer_and_nan_pixels(samples_dir, tmp_path):
    """A uint8 photo (levels 0..255) was clipped to [0, 1] and written as 0 or 255 everywhere; a
    NaN pixel was written as a black one. Both wrote a file and said nothing."""
    from facecloak.errors import InvalidInputError
    from facecloak.io import read_image, write_image
    from facecloak.transforms import levels_8bit

    pixels = read_image(samples_dir / "astronaut.jpg").pixels
    with pytest.raises(InvalidInputError, match="float.*uint8"):
        write_image(tmp_path / "levels.png", (pixels * 255).round().to(torch.uint8))
    broken = pixels.clone()
    broken[:, 100:110, 100:110] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        write_image(tmp_path / "nan.png", broken)
    assert not list(tmp_path.iterdir())
    assert torch.equal(levels_8bit(pixels), (pixels * 255).round())


def test_quantisation_tables_are_libjpegs_at_every_quality(samples_dir):
    """Below quality 50 libjpeg scales by 5000 // quality (integers): a float division gave other
    tables at 30, 33, ... than the real encoder the simulated JPEG stands in for."""
    import io

    import numpy as np
    from PIL import Image

    from facecloak.transforms import quantisation_tables

    with Image.open(samples_dir / "grace_hopper.jpg") as photo:
        face = photo.convert("RGB").crop((150, 100, 214, 164))
    for quality in range(1, 101):
        buffer = io.BytesIO()
        face.save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as encoded:
            real = encoded.quantization
        luma, chroma = quantisation_tables(torch.tensor([float(quality)]))
        assert np.array_equal(np.array(real[0]).reshape(8, 8), luma[0].int().numpy()), quality
        assert np.array_equal(np.array(real[1]).reshape(8, 8), chroma[0].int().numpy()), quality
