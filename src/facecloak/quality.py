"""Image-quality measures of a protection: SSIM / DSSIM, PSNR and L-infinity, as pure tensor functions.

DSSIM = (1 - SSIM) / 2, the measure Fawkes budgets its cloaks in. SSIM uses the usual 11-tap
Gaussian window (sigma 1.5) and constants of Wang et al. (2004), averaged over RGB channels and
over the pixels where the window fits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from facecloak.transforms import LUMA_WEIGHTS, separable_filter

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
"""Wang et al.'s Gaussian window: side and sigma, in pixels."""

_C1 = 0.01**2
_C2 = 0.03**2


def _gaussian_window(size: int, sigma: float, like: Tensor) -> Tensor:
    offsets = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _window_size(a: Tensor, window: int) -> int:
    """The Gaussian window's side for images ``a``: ``window``, or as large as they allow (odd)."""
    size = min(window, a.shape[-1], a.shape[-2])
    return size if size % 2 == 1 else size - 1


def _blur(x: Tensor, size: int, sigma: float) -> Tensor:
    """Separable Gaussian blur of every channel, 'valid' area only."""
    return separable_filter(x, _gaussian_window(size, sigma, x))


def reference_means(a: Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> tuple[Tensor, Tensor]:
    """The local means of ``a`` and of ``a**2``: the statistics of SSIM's first image.

    An optimisation that measures many changed versions against one clean image computes these
    once (`box_dssim`'s ``reference``): two of SSIM's five blurs, each step.
    """
    size = _window_size(a, window)
    return tuple(_blur(torch.cat([a, a * a], 1), size, sigma).split(a.shape[1], 1))


def _ssim_factors(
    mean_a: Tensor, mean_b: Tensor, square_a: Tensor, square_b: Tensor, cross: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SSIM's two numerator and two denominator factors from the five local statistics.

    SSIM = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2)).
    """
    means = mean_a * mean_b
    squares = mean_a.square() + mean_b.square()
    numerator_mean = 2 * means + _C1
    numerator_cov = 2 * (cross - means) + _C2
    denominator_mean = squares + _C1
    denominator_var = square_a + square_b - squares + _C2
    return numerator_mean, numerator_cov, denominator_mean, denominator_var


def ssim_map(a: Tensor, b: Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Per-pixel SSIM of (B, C, H, W) images in [0, 1], over the 'valid' area: (B, C, H-10, W-10).

    Images smaller than the window use a window as large as they allow.
    """
    size = _window_size(a, window)
    stacked = torch.cat([a, b, a * a, b * b, a * b], 1)  # one blur for the five statistics
    mean_a, mean_b, square_a, square_b, cross = _blur(stacked, size, sigma).split(a.shape[1], 1)
    numerator_mean, numerator_cov, denominator_mean, denominator_var = _ssim_factors(
        mean_a, mean_b, square_a, square_b, cross
    )
    return numerator_mean * numerator_cov / (denominator_mean * denominator_var)


class _WeightedSsim(torch.autograd.Function):
    """(B, K) sums of SSIM of ``b`` against ``a`` under each of K weights, ``a``'s local means given.

    The same value as `ssim_map` times the weight, summed; the gradient with
    respect to ``b`` comes in closed form instead of through autograd's record of some twenty
    operations over the map: SSIM depends on ``b`` only through three blurred maps (its mean, its
    mean square and its mean product with ``a``), so the gradient is one blur (transposed: the
    window is symmetric) of those three maps' partial derivatives. About half the time of the
    recorded backward pass, for the DSSIM penalty every cloak step pays.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        a: Tensor,
        b: Tensor,
        mean_a: Tensor,
        square_a: Tensor,
        weight: Tensor,
        kernel: Tensor,
    ) -> Tensor:
        channels = a.shape[1]
        mean_b, square_b, cross = separable_filter(torch.cat([b, b * b, a * b], 1), kernel).split(channels, 1)
        numerator_mean, numerator_cov, denominator_mean, denominator_var = _ssim_factors(
            mean_a, mean_b, square_a, square_b, cross
        )
        values = numerator_mean * numerator_cov / (denominator_mean * denominator_var)
        ctx.save_for_backward(
            a,
            b,
            mean_a,
            mean_b,
            numerator_mean,
            numerator_cov,
            denominator_mean,
            denominator_var,
            values,
            weight,
            kernel,
        )
        return torch.einsum("bchw,bkhw->bk", values, weight)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, b, mean_a, mean_b, num_mean, num_cov, den_mean, den_var, values, weight, kernel = ctx.saved_tensors
        scaled = values * torch.einsum("bkhw,bk->bhw", weight, grad)[:, None]
        inverse_cov, inverse_var = num_cov.reciprocal(), den_var.reciprocal()
        # partial derivatives of SSIM by b's blurred mean, mean square and mean product with a
        by_mean = (
            2
            * scaled
            * (
                mean_a * (num_mean.reciprocal() - inverse_cov)
                - mean_b * (den_mean.reciprocal() - inverse_var)
            )
        )
        by_square = -scaled * inverse_var
        by_cross = 2 * scaled * inverse_cov
        edge = kernel.shape[0] - 1
        spread = torch.nn.functional.pad(
            torch.cat([by_mean, by_square, by_cross], 1), (edge, edge, edge, edge)
        )
        through_mean, through_square, through_cross = separable_filter(spread, kernel).split(a.shape[1], 1)
        return None, through_mean + 2 * b * through_square + a * through_cross, None, None, None, None


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """(B,) mean SSIM of (B, C, H, W) images in [0, 1].

    Example:
        >>> x = torch.rand(2, 3, 32, 32)
        >>> ssim(x, x)
        tensor([1., 1.])
    """
    return ssim_map(a, b).flatten(1).mean(1)


def box_mask(size: tuple[int, int] | torch.Size, boxes: Tensor, device: torch.device | str) -> Tensor:
    """(..., h, w) bool: which pixels of a ``size`` (h, w) grid lie inside each box.

    ``boxes``: (..., 4) integer ``x0, y0, x1, y1``, x1 and y1 excluded.
    """
    ys = torch.arange(size[0], device=device)[:, None]
    xs = torch.arange(size[1], device=device)[None, :]
    x0, y0, x1, y1 = (boxes[..., k].to(device)[..., None, None] for k in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def _as_box_sets(boxes: Tensor) -> Tensor:
    """``boxes`` as (n, K, 4): one box per row (n, 4) becomes a set of one."""
    return boxes[:, None] if boxes.ndim == 2 else boxes


def largest_share(values: Tensor, shares: Sequence[float] | None) -> Tensor:
    """(n,) the largest of (n, K) ``values``, each first divided by its box's share of the cap."""
    if shares is not None:
        values = values / torch.tensor(shares, dtype=values.dtype, device=values.device)
    return values.amax(1)


def box_means(values: Tensor, boxes: Tensor, shares: Sequence[float] | None = None) -> Tensor:
    """(n,) mean of (n, h, w) ``values`` inside each row's box (`box_mask`).

    ``boxes``: (n, 4), or (n, K, 4) for K boxes per row: then the largest of the K means, each
    divided by its share (``shares``, K numbers: a box with share 0.5 is held to half the cap).
    """
    inside = box_mask(values.shape[-2:], _as_box_sets(boxes), values.device).to(values.dtype)
    means = (values[:, None] * inside).flatten(2).sum(2) / inside.flatten(2).sum(2).clamp_min(1)
    return largest_share(means, shares)


def dssim(a: Tensor, b: Tensor) -> Tensor:
    """(B,) structural dissimilarity (1 - SSIM) / 2: 0 when identical; Fawkes' 'mid' cap is 0.012."""
    return (1.0 - ssim(a, b)) / 2.0


def box_dssim(
    a: Tensor,
    b: Tensor,
    boxes: Tensor,
    reference: tuple[Tensor, Tensor] | None = None,
    shares: Sequence[float] | None = None,
) -> Tensor:
    """(B,) DSSIM of crops inside their boxes (`box_dssims`); with K boxes a crop, the largest.

    ``shares``: K numbers, each box's DSSIM divided by its own before the largest is taken, so a
    cap on the result holds each box to its share of it (a face box to all of a cap, the wider
    region around it to part).
    """
    return largest_share(box_dssims(a, b, boxes, reference), shares)


def box_dssims(a: Tensor, b: Tensor, boxes: Tensor, reference: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """(B, K) DSSIM of (B, C, H, W) crops measured only inside integer ``boxes`` (B, 4) ``x0, y0, x1, y1``.

    Equal to `dssim` of ``a[..., y0:y1, x0:x1]`` and ``b[...]``: only windows that fit inside the
    box count. Lets a batch of padded crops of different faces be measured in one pass, over
    just the rectangle that holds all the boxes. ``reference``: `reference_means` of the whole
    of ``a`` (a 'valid' blur is local, so the rectangle's are a slice of it).

    ``boxes`` (B, K, 4): K boxes per crop (a face and the wider region around it), measured from
    one SSIM map; (B, 4) is one box a crop (K = 1).
    """
    boxes = _as_box_sets(boxes)
    left, top = int(boxes[..., 0].min()), int(boxes[..., 1].min())
    right, bottom = int(boxes[..., 2].max()), int(boxes[..., 3].max())
    a, b = a[..., top:bottom, left:right], b[..., top:bottom, left:right]
    boxes = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype, device=boxes.device)
    if reference is not None and _window_size(a, SSIM_WINDOW) == SSIM_WINDOW:
        edge = SSIM_WINDOW - 1  # a 'valid' blur is this much smaller than its input
        reference = tuple(m[..., top : bottom - edge, left : right - edge] for m in reference)
    else:
        reference = None
    size = _window_size(a, SSIM_WINDOW)
    margin = (size - 1) // 2
    map_size = (a.shape[-2] - 2 * margin, a.shape[-1] - 2 * margin)
    # the map's pixel (y, x) is the window centred on (y + margin, x + margin): a window fits
    # inside a box when its centre lies a margin inside it
    shrunk = boxes + torch.tensor([0, 0, -2 * margin, -2 * margin], dtype=boxes.dtype, device=boxes.device)
    weight = box_mask(map_size, shrunk, a.device).to(a.dtype)  # (B, K, h, w)
    weight = weight / (weight.flatten(2).sum(2) * a.shape[1]).clamp_min(1)[..., None, None]
    if reference is not None:
        mean = _WeightedSsim.apply(a, b, *reference, weight, _gaussian_window(size, SSIM_SIGMA, a))
    else:
        mean = torch.einsum("bchw,bkhw->bk", ssim_map(a, b), weight)
    # a box thinner than the window holds none of its windows: it read SSIM 0 (DSSIM 0.5, also
    # unchanged), and the cap scaled a face cut off by the photo's edge to no change at all.
    # `dssim` of its crop uses a window as large as the box allows; an empty box changed nothing.
    small = (boxes[..., 2] - boxes[..., 0] < size) | (boxes[..., 3] - boxes[..., 1] < size)
    if bool(small.any()):
        mean = mean.clone()
        for i, k in small.nonzero().tolist():
            x0, y0, x1, y1 = (max(0, int(v)) for v in boxes[i, k])
            crop_a, crop_b = a[i : i + 1, :, y0:y1, x0:x1], b[i : i + 1, :, y0:y1, x0:x1]
            mean[i, k] = ssim(crop_a, crop_b)[0] if crop_a.numel() else 1.0
    return (1.0 - mean) / 2.0


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """(B,) peak signal-to-noise ratio in dB of images in [0, 1] (inf when identical)."""
    mse = (a - b).square().flatten(1).mean(1)
    return torch.where(
        mse > 0, 10.0 * torch.log10(1.0 / mse.clamp_min(1e-20)), torch.full_like(mse, math.inf)
    )


def linf(a: Tensor, b: Tensor) -> Tensor:
    """(B,) largest absolute change, in units of 1/255."""
    return (a - b).abs().flatten(1).amax(1) * 255.0


def quality_report(original: Tensor, changed: Tensor) -> dict[str, float]:
    """DSSIM, PSNR and L-infinity between two (3, H, W) images, as plain floats for a report."""
    a, b = original[None].float(), changed[None].float()
    return {
        "dssim": round(float(dssim(a, b)[0]), 6),
        "psnr": round(float(psnr(a, b)[0]), 3),
        "linf": round(float(linf(a, b)[0]), 3),
    }


# -- colour difference: CIEDE2000 -------------------------------------------------------------

_SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(images: Tensor) -> Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIELAB (L* in 0..100), D65 white."""
    linear = torch.where(images <= 0.04045, images / 12.92, ((images.clamp_min(0) + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_SRGB_TO_XYZ, dtype=images.dtype, device=images.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    xyz = xyz / torch.tensor(_D65_WHITE, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def ciede2000_map(a: Tensor, b: Tensor) -> Tensor:
    """(B, H, W) per-pixel CIEDE2000 colour difference of (B, 3, H, W) sRGB images in [0, 1].

    Sharma, Wu & Dalal (2005), with kL = kC = kH = 1. About 1 is a just-noticeable difference
    side by side; 2-3 is visible at a glance. Computed in the images' precision, at least float32:
    on a cloaked sample photo float32 gives the same mean as float64 to six or seven digits in half
    the time, which the colour cap and the native-size measure of a phone photo's face pay. Single
    pixels can differ by up to about 0.05 where two hues lie 180 degrees apart (the formula's mean
    hue jumps there: Sharma's pair 14 is off by 0.058 in float32).
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    lab1, lab2 = rgb_to_lab(a.to(dtype)), rgb_to_lab(b.to(dtype))
    l1, a1, b1 = lab1.unbind(1)
    l2, a2, b2 = lab2.unbind(1)
    chroma_mean = (torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2
    g = 0.5 * (1 - torch.sqrt(chroma_mean**7 / (chroma_mean**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.remainder(torch.atan2(b1, a1p), 2 * math.pi)
    h2p = torch.remainder(torch.atan2(b2, a2p), 2 * math.pi)
    delta_l = l2 - l1
    delta_c = c2p - c1p
    dh = h2p - h1p
    dh = torch.where(dh > math.pi, dh - 2 * math.pi, torch.where(dh < -math.pi, dh + 2 * math.pi, dh))
    dh = torch.where(c1p * c2p == 0, torch.zeros_like(dh), dh)
    delta_h = 2 * torch.sqrt(c1p * c2p) * torch.sin(dh / 2)
    l_mean = (l1 + l2) / 2
    c_mean = (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = torch.where(
        (h1p - h2p).abs() <= math.pi,
        h_sum / 2,
        torch.where(h_sum < 2 * math.pi, (h_sum + 2 * math.pi) / 2, (h_sum - 2 * math.pi) / 2),
    )
    h_mean = torch.where(c1p * c2p == 0, h_sum, h_mean)
    t = (
        1
        - 0.17 * torch.cos(h_mean - math.radians(30))
        + 0.24 * torch.cos(2 * h_mean)
        + 0.32 * torch.cos(3 * h_mean + math.radians(6))
        - 0.20 * torch.cos(4 * h_mean - math.radians(63))
    )
    delta_theta = math.radians(30) * torch.exp(-(((torch.rad2deg(h_mean) - 275) / 25) ** 2))
    r_c = 2 * torch.sqrt(c_mean**7 / (c_mean**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / torch.sqrt(20 + (l_mean - 50) ** 2)
    s_c = 1 + 0.045 * c_mean
    s_h = 1 + 0.015 * c_mean * t
    r_t = -torch.sin(2 * delta_theta) * r_c
    terms = (delta_l / s_l) ** 2 + (delta_c / s_c) ** 2 + (delta_h / s_h) ** 2
    terms = terms + r_t * (delta_c / s_c) * (delta_h / s_h)
    return terms.clamp_min(0).sqrt().to(a.dtype)


def ciede2000_stats(a: Tensor, b: Tensor, weight: Tensor | None = None) -> tuple[float, float]:
    """Mean and 99th percentile of CIEDE2000 between two (3, H, W) images (optionally where weight > 0)."""
    values = ciede2000_map(a[None].float(), b[None].float())[0]
    if weight is not None:
        values = values[weight > 0]
    values = values.flatten()
    if values.numel() == 0:
        return 0.0, 0.0
    return float(values.mean()), float(torch.quantile(values.double(), 0.99))


def face_detail(image: Tensor, box: Tensor | list[float]) -> float:
    """No-reference detail of a face: its mean luminance gradient over the whole photo's.

    About 1 for a face as sharp as the rest of its photo; a blurred face scores far lower, a
    pixelated one is flat inside its blocks. Needs no original, so it measures any protected
    photo as a viewer sees it.

    Args:
        image: (3, H, W) in [0, 1].
        box: the face's ``x1, y1, x2, y2`` in pixels.

    Example:
        >>> photo = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
        >>> round(face_detail(photo, [16, 16, 48, 48]), 2)
        1.02
        >>> photo[:, 16:48, 16:48] = 0.5  # a face painted flat
        >>> face_detail(photo, [16, 16, 48, 48])
        0.0
    """
    luminance = (image * torch.tensor(LUMA_WEIGHTS, device=image.device).view(3, 1, 1)).sum(0)
    gradient = (luminance[1:, :-1] - luminance[:-1, :-1]).abs() + (
        luminance[:-1, 1:] - luminance[:-1, :-1]
    ).abs()
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = x2 - x1, y2 - y1  # the middle of the box: skin, eyes, nose, mouth; no hair
    left, right = max(0, int(x1 + 0.15 * width)), min(gradient.shape[1], int(x2 - 0.15 * width))
    top, bottom = max(0, int(y1 + 0.15 * height)), min(gradient.shape[0], int(y2 - 0.15 * height))
    if right <= left or bottom <= top:
        return math.nan
    return float(gradient[top:bottom, left:right].mean() / gradient.mean().clamp_min(1e-8))
