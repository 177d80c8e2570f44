"""Differentiable stand-ins for what happens to a photo after upload: JPEG, resizing, blur.

The cloak optimises through these (expectation over transformations) so that its effect survives
the re-compression and rescaling upload sites apply. JPEG is modelled as the real codec does it
(JFIF YCbCr, 4:2:0 chroma subsampling, 8x8 DCT, IJG quantisation tables scaled by quality) with
straight-through rounding: the forward pass quantises exactly, the backward pass lets the
gradient through as if rounding were the identity (BPDA, Athalye et al. 2018).

All functions take (B, 3, H, W) tensors in [0, 1] and keep their shape.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from facecloak.errors import InvalidInputError

# Annex K of the JPEG standard (ITU-T T.81): base quantisation tables, row-major.
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8,) * 4,
)
RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
"""JFIF's RGB -> YCbCr matrix (without the 128 chroma offset): the one colour matrix of facecloak,
used by the differentiable JPEG, the perceptual budget and every luminance."""

LUMA_WEIGHTS = RGB_TO_YCBCR[0]
"""Rec. 601 luma weights of R, G, B (the Y row of `RGB_TO_YCBCR`)."""

DOWNSCALED_BLUR_SIGMA_PX = 3.0
"""`downscaled_gaussian_blur` blurs at 1/k resolution, k = sigma // this (a strong blur keeps no
detail finer than a few sigma, so the smaller copy loses nothing visible)."""


def is_grey(images: Tensor) -> Tensor:
    """(B,) whether each (B, 3, H, W) image has equal channels everywhere: a black-and-white photo."""
    return (images.amax(1) - images.amin(1)).flatten(1).amax(1) == 0


def to_grey(images: Tensor) -> Tensor:
    """(B, 3, H, W) images as their luma in all three channels: what a grey photo can hold."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device)
    luma = torch.einsum("c,bchw->bhw", weights, images)
    return luma[:, None].expand_as(images).contiguous()


def quantisation_tables(quality: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 8, 8) luma and chroma tables for per-image ``quality`` (B,) in [1, 100], as libjpeg scales them."""
    quality = quality.clamp(1, 100)
    # libjpeg divides in integers: 5000 // 30 = 166, not 166.7 (a different table at quality 30)
    scale = torch.where(quality < 50, torch.floor(5000.0 / quality), 200.0 - 2.0 * quality)[:, None, None]
    luma = torch.tensor(_LUMA_TABLE, dtype=quality.dtype, device=quality.device)
    chroma = torch.tensor(_CHROMA_TABLE, dtype=quality.dtype, device=quality.device)
    scaled = [torch.floor((table * scale + 50.0) / 100.0).clamp(1, 255) for table in (luma, chroma)]
    return scaled[0], scaled[1]


def _dct_matrix(like: Tensor) -> Tensor:
    """Orthonormal 8-point DCT-II matrix D (rows are basis vectors): coefficients = D x D^T."""
    k = torch.arange(8, dtype=like.dtype, device=like.device)
    matrix = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    matrix[0] = matrix[0] / math.sqrt(2)
    return matrix


def _block_dct(like: Tensor) -> Tensor:
    """(64, 64) 2-D DCT K of flattened 8x8 blocks: coefficients = block @ K^T, block = coefficients @ K.

    K = D (x) D, so one matrix product over every block replaces two tiny 8x8 products per block.
    Built once per dtype and device (the cloak calls the JPEG round trip every step).
    """
    return _block_dct_for(like.dtype, like.device)


@functools.lru_cache(maxsize=8)
def _block_dct_for(dtype: torch.dtype, device: torch.device) -> Tensor:
    dct = _dct_matrix(torch.empty(0, dtype=dtype, device=device))
    return torch.kron(dct, dct)


def levels_8bit(pixels: Tensor) -> Tensor:
    """``pixels`` in [0, 1] as the 8-bit levels a saved image holds (0..255, as float).

    The one rounding rule for "as it will be written": `facecloak.io.to_uint8`, the cloak's stored
    output and dlib's grey conversion all go through it, on the tensor's own device.
    """
    if not pixels.is_floating_point():
        # a uint8 photo of levels 0..255 was clipped to [0, 1]: every level above 0 written as 255
        raise InvalidInputError(f"pixels must be a floating tensor in [0, 1], got {pixels.dtype}")
    levels = pixels.detach().float().clamp(0, 1).mul_(255.0).round_()  # in place: one 12 MP copy, not three
    if bool(levels.isnan().any()):  # a NaN pixel was written as level 0: a black patch, said nothing
        raise InvalidInputError("pixels must hold finite values in [0, 1] (a NaN pixel has no 8-bit level)")
    return levels


def straight_through_round(x: Tensor) -> Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _quantise_blocks(planes: Tensor, table: Tensor, dct: Tensor) -> Tensor:
    """8x8 block DCT of (B, C, H, W) ``planes``, quantised with per-image ``table`` (B, 8, 8).

    Then dequantised and inverse-transformed; ``dct`` is `_block_dct`.
    """
    batch, channels, height, width = planes.shape
    blocks = planes.reshape(batch, channels, height // 8, 8, width // 8, 8).transpose(3, 4)
    blocks = blocks.reshape(batch, channels, height // 8, width // 8, 64)
    coefficients = blocks @ dct.T
    table = table.reshape(batch, 1, 1, 1, 64)
    restored = straight_through_round(coefficients / table) * table
    blocks = (restored @ dct).reshape(batch, channels, height // 8, width // 8, 8, 8).transpose(3, 4)
    return blocks.reshape(batch, channels, height, width)


def jpeg_compress(images: Tensor, quality: float | Tensor, *, subsample_chroma: bool = True) -> Tensor:
    """Differentiable JPEG round trip of (B, 3, H, W) images in [0, 1].

    Args:
        images: (B, 3, H, W) in [0, 1]. Block boundaries fall on multiples of 8 (16 with chroma
            subsampling) from the top-left pixel, as in a real file.
        quality: JPEG quality 1..100, one for all or one per image (B,).
        subsample_chroma: 4:2:0 chroma subsampling, as most encoders (and upload sites) use.

    Returns:
        (B, 3, H, W): the decoded picture, on average within a grey level of a real codec's
        (0.6-1.1 levels against PIL at qualities 10-100); single pixels differ by more (up to
        15 levels at quality 75), where a coefficient rounds to the other side of a step.

    Example:
        >>> x = torch.rand(1, 3, 32, 32)
        >>> jpeg_compress(x, 75).shape
        torch.Size([1, 3, 32, 32])
    """
    quality = torch.as_tensor(quality, dtype=images.dtype, device=images.device).expand(images.shape[0])
    if not images.requires_grad:
        return jpeg_decoded(images, quality, subsample_chroma).clamp(0, 1)
    return _JpegRoundTrip.apply(images, quality, subsample_chroma)


def jpeg_decoded(images: Tensor, quality: Tensor, subsample_chroma: bool = True) -> Tensor:
    """The JPEG round trip of `jpeg_compress` before its final clip to [0, 1], built of autograd ops.

    Differentiable as it is (straight-through rounding), but `jpeg_compress` runs it without a
    graph and back-propagates by `_JpegRoundTrip`: the same gradient, and forward and backward
    together about a third faster (a 175x163 face crop: 3.6 -> 2.3 ms on 2 CPU cores).
    """
    batch, _, height, width = images.shape
    luma_table, chroma_table = quantisation_tables(quality)
    unit = 16 if subsample_chroma else 8
    pad_h, pad_w = (-height) % unit, (-width) % unit
    padded = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else images
    conversion = torch.tensor(RGB_TO_YCBCR, dtype=images.dtype, device=images.device)
    ycbcr = torch.einsum("ij,bjhw->bihw", conversion, padded * 255.0)
    dct = _block_dct(images)
    luma = _quantise_blocks(ycbcr[:, :1] - 128.0, luma_table, dct)[:, 0] + 128.0  # JPEG's level shift
    chroma = ycbcr[:, 1:]  # centred on 0 already (the file's +128 offset and its removal cancel)
    if subsample_chroma:
        chroma = F.avg_pool2d(chroma, 2)
    chroma = _quantise_blocks(chroma, chroma_table, dct)
    if subsample_chroma:
        chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    y, cb, cr = luma, chroma[:, 0], chroma[:, 1]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1) / 255.0
    return rgb[..., :height, :width]


class _JpegRoundTrip(torch.autograd.Function):
    """`jpeg_decoded` clipped to [0, 1], with its backward pass written out.

    With rounding passed straight through, the round trip is linear: the 8x8 DCT is orthonormal
    and quantisation divides and multiplies by the same table, so the luma path is the identity
    and the chroma path is the 2x2 average followed by the 2x bilinear upscale. The backward pass
    applies the transposes of those few linear maps instead of retracing every block product.
    """

    @staticmethod
    def forward(ctx, images: Tensor, quality: Tensor, subsample_chroma: bool) -> Tensor:
        decoded = jpeg_decoded(images, quality, subsample_chroma)
        ctx.save_for_backward((decoded >= 0) & (decoded <= 1))
        ctx.subsample_chroma = subsample_chroma
        return decoded.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inside,) = ctx.saved_tensors
        height, width = grad.shape[-2:]
        unit = 16 if ctx.subsample_chroma else 8
        grad = F.pad(grad * inside / 255.0, (0, (-width) % unit, 0, (-height) % unit))
        red, green, blue = grad.unbind(1)
        luma = red + green + blue
        chroma = torch.stack([-0.344136 * green + 1.772 * blue, 1.402 * red - 0.714136 * green], 1)
        if ctx.subsample_chroma:  # transposes of the bilinear 2x upscale and of the 2x2 average
            batch, channels, rows, columns = chroma.shape
            half = [batch, channels, rows // 2, columns // 2]
            upscale_transpose = torch.ops.aten.upsample_bilinear2d_backward
            chroma = upscale_transpose(chroma, [rows, columns], half, False, 2.0, 2.0)
            chroma = F.interpolate(chroma, scale_factor=2, mode="nearest") / 4.0
        conversion = torch.tensor(RGB_TO_YCBCR, dtype=grad.dtype, device=grad.device)
        padded = torch.einsum("ij,bihw->bjhw", conversion, torch.cat([luma[:, None], chroma], 1)) * 255.0
        return _replicate_pad_transpose(padded, height, width), None, None


def _replicate_pad_transpose(grad: Tensor, height: int, width: int) -> Tensor:
    """Gradient w.r.t. (..., height, width) images of their replicate padding (right, bottom) to ``grad``."""
    out = grad[..., :height, :width].clone()
    if grad.shape[-1] > width:
        out[..., width - 1] += grad[..., :height, width:].sum(-1)
    if grad.shape[-2] > height:
        out[..., height - 1, :] += grad[..., height:, :].sum(-2)[..., :width]
        out[..., height - 1, width - 1] += grad[..., height:, width:].sum((-1, -2))
    return out


def resize_roundtrip(images: Tensor, scale: float) -> Tensor:
    """Downscale by ``scale`` (area averaging, as a photo site's thumbnailer) and back up (bilinear)."""
    if scale >= 1.0:
        return images
    height, width = images.shape[-2:]
    small = F.interpolate(
        images, size=(max(1, round(height * scale)), max(1, round(width * scale))), mode="area"
    )
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


def separable_filter(images: Tensor, kernel: Tensor, pad_mode: str | None = None) -> Tensor:
    """Filter every channel of (B, C, H, W) ``images`` with the 1-D ``kernel`` along x, then y.

    ``pad_mode`` None keeps the 'valid' area only; else each pass pads by the kernel's radius in
    that mode ("reflect", "replicate") and the size is kept. The result comes back contiguous.

    On the CPU without a graph to record, the filter is a sum of shifted slices (`_shifted_sums`).
    Otherwise it is two grouped convolutions in channels-last memory: on the CPU they are 2-8x
    faster there than in the default layout (an 11-tap Gaussian over a 9-channel 220x200 crop
    forward and backward 6.9 -> 4.0 ms), with the same values.
    """
    channels, taps = images.shape[1], kernel.shape[0]
    radius = (taps - 1) // 2
    if images.device.type == "cpu" and not (torch.is_grad_enabled() and images.requires_grad):
        return _shifted_sums(images, kernel.tolist(), radius, pad_mode)
    out = images.contiguous(memory_format=torch.channels_last)
    if pad_mode is not None:
        out = F.pad(out, (radius, radius, 0, 0), mode=pad_mode)
    out = F.conv2d(out, kernel.view(1, 1, 1, taps).expand(channels, 1, 1, taps), groups=channels)
    if pad_mode is not None:
        out = F.pad(out, (0, 0, radius, radius), mode=pad_mode)
    out = F.conv2d(out, kernel.view(1, 1, taps, 1).expand(channels, 1, taps, 1), groups=channels)
    return out.contiguous()


def _shifted_sums(images: Tensor, taps: list[float], radius: int, pad_mode: str | None) -> Tensor:
    """`separable_filter` as a weighted sum of shifted slices, one pass per axis, without autograd.

    On the CPU a depthwise convolution of a few channels is slow: an 11-tap Gaussian over a
    9-channel 300x250 crop takes 2.1 ms as two grouped convolutions and 0.7 ms as these sums (the
    same values; the cloak's DSSIM penalty and gradient smoothing run it every step). Recorded for
    autograd, the sums' backward pass is slower than the convolutions', so those keep them.
    """
    out = images
    for axis in (-1, -2):
        if pad_mode is not None:
            padding = (radius, radius, 0, 0) if axis == -1 else (0, 0, radius, radius)
            out = F.pad(out, padding, mode=pad_mode)
        length = out.shape[axis] - len(taps) + 1
        summed = out.narrow(axis, 0, length) * taps[0]
        for offset, weight in enumerate(taps[1:], start=1):
            summed.add_(out.narrow(axis, offset, length), alpha=weight)
        out = summed
    return out.contiguous()


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflect padding; ``sigma`` in pixels (0 returns the input)."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    shortest = min(images.shape[-1], images.shape[-2])
    if radius >= shortest:
        # reflect padding needs a radius below each side; cutting the kernel to fit the shorter
        # side left a thin strip (a face cut off by the photo's edge) all but unblurred, and one
        # a pixel thin not blurred at all. Past the edge the border pixels are repeated instead.
        return separable_filter(images, _gaussian_kernel(radius, sigma, images), "replicate")
    return separable_filter(images, _gaussian_kernel(radius, sigma, images), "reflect")


def _gaussian_kernel(radius: int, sigma: float, like: Tensor) -> Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def downscaled_gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """`gaussian_blur` of (B, C, H, W) for any sigma: a large one blurs a downscaled copy.

    A strong blur has no fine detail left, so blurring at 1/k resolution and upsampling is the same
    picture at a fraction of the cost (a 1000 px face needs sigma ~150 px). Below
    2 x `DOWNSCALED_BLUR_SIGMA_PX` it is exactly `gaussian_blur`.
    """
    height, width = images.shape[-2:]
    factor = max(1, int(sigma // DOWNSCALED_BLUR_SIGMA_PX))
    # at least one pixel each way: a crop thinner than the factor (a face cut off by the photo's
    # edge, blurred strongly) had a side of zero and crashed the blur
    small_size = (max(1, height // factor), max(1, width // factor))
    small = F.interpolate(images, size=small_size, mode="area") if factor > 1 else images
    small = gaussian_blur(small, sigma / factor)
    if factor > 1:
        small = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return small
