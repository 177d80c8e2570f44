"""How much a cloak may change each pixel: a just-noticeable-difference map, and the limits that enforce it.

A flat per-pixel cap spends the same change on a smooth cheek as on hair, and the eye sees it
on the cheek first. The perceptual budget gives each pixel an allowance from a
just-noticeable-difference (JND) model of the clean face: luminance adaptation (a change is
harder to see in dark and in very bright areas; Chou & Li, 1995) and texture masking (harder
to see where the image already varies: hair, brows, beard, textured skin), combined by the
nonlinear additivity model of Yang et al. (2005). Colour changes are held to a small share of
the brightness allowance: a shift of hue on skin, or an iris turning a colour, is what people
notice first, while the face models read mostly brightness structure.

All functions are pure tensor functions on (n, 3, h, w) RGB crops in [0, 1]; allowances are in
the same units (multiply by 255 for grey levels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from facecloak import quality, transforms

RGB_TO_YCBCR = torch.tensor(transforms.RGB_TO_YCBCR)
"""`facecloak.transforms.RGB_TO_YCBCR` as a float32 tensor: for changes rather than pixels."""
YCBCR_TO_RGB = torch.linalg.inv(RGB_TO_YCBCR)
"""Its inverse (inverted once: `limit_change` runs every step)."""

BACKGROUND_WINDOW = 5
"""Side of the window whose mean brightness a pixel's change is seen against (pixels)."""

TEXTURE_WEIGHT = 0.6
"""Texture masking: the allowance grows by this times the local standard deviation of brightness."""

MASKING_OVERLAP = 0.3
"""Yang et al.'s overlap constant: the two masking effects do not simply add."""

MAX_JND = 24.0 / 255.0
"""No pixel's allowance exceeds this, however dark or textured its surroundings."""


def _local_mean(x: Tensor, window: int) -> Tensor:
    pad = window // 2
    return F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), window, stride=1)


def luminance_adaptation(background: Tensor) -> Tensor:
    """Visibility threshold of a brightness change against ``background`` brightness (both in [0, 1]).

    Chou & Li's curve, in grey levels: 17 (1 - sqrt(L / 127)) + 3 below mid-grey, rising slowly
    (3 / 128 per level) above it. About 3 levels on mid-grey, up to 20 in the dark.
    """
    level = background * 255.0
    dark = 17.0 * (1.0 - torch.sqrt(level.clamp_min(0) / 127.0)) + 3.0
    bright = 3.0 / 128.0 * (level - 127.0) + 3.0
    return torch.where(level <= 127.0, dark, bright) / 255.0


def jnd_map(crops: Tensor, *, texture_weight: float = TEXTURE_WEIGHT) -> Tensor:
    """(n, 1, h, w) just-noticeable brightness change of every pixel of (n, 3, h, w) RGB crops.

    Example:
        >>> flat = torch.full((1, 3, 16, 16), 0.5)
        >>> float(jnd_map(flat).mean() * 255)  # mid-grey, no texture: about 3 grey levels
        3.0...
    """
    luma = (RGB_TO_YCBCR[0].to(crops).view(1, 3, 1, 1) * crops).sum(1, keepdim=True)
    background = _local_mean(luma, BACKGROUND_WINDOW)
    spread = (_local_mean(luma * luma, BACKGROUND_WINDOW) - background**2).clamp_min(0).sqrt()
    adaptation = luminance_adaptation(background)
    texture = texture_weight * spread
    combined = adaptation + texture - MASKING_OVERLAP * torch.minimum(adaptation, texture)
    return combined.clamp(max=MAX_JND)


def _change_to_ycbcr(delta: Tensor) -> Tensor:
    """A (n, 3, h, w) RGB change as brightness (Y) and colour (Cb, Cr) changes."""
    return torch.einsum("ij,njhw->nihw", RGB_TO_YCBCR.to(delta), delta)


def _change_to_rgb(ycbcr: Tensor) -> Tensor:
    """The inverse of `_change_to_ycbcr`."""
    return torch.einsum("ij,njhw->nihw", YCBCR_TO_RGB.to(ycbcr), ycbcr)


def limit_change(delta: Tensor, max_luma: Tensor | float, chroma_share: Tensor | float) -> Tensor:
    """Clip a (n, 3, h, w) RGB change in brightness, colour, and per channel.

    |Y| <= max_luma, |Cb| and |Cr| <= chroma_share x max_luma, every RGB channel <= max_luma.
    ``max_luma`` is a number or a (n, 1, h, w) per-pixel allowance (e.g. a scaled `jnd_map`);
    ``chroma_share`` a number or one per face, (n, 1, 1, 1).
    """
    ycbcr = _change_to_ycbcr(delta)
    luma_limit = torch.as_tensor(max_luma, dtype=delta.dtype, device=delta.device)
    if luma_limit.ndim == 0:
        luma_limit = luma_limit.view(1, 1, 1, 1)
    chroma_limit = chroma_share * luma_limit
    # one flat allowance with one share per face: (1, 1, 1, 1) beside (n, 1, 1, 1) did not concatenate
    limits = torch.cat(torch.broadcast_tensors(luma_limit, chroma_limit, chroma_limit), dim=1)
    rgb = _change_to_rgb(torch.maximum(torch.minimum(ycbcr, limits), -limits))
    # the L-infinity cap scales the whole change of a pixel (clipping channels one by one would
    # change its colour balance, i.e. add chroma)
    largest = rgb.abs().amax(dim=1, keepdim=True)
    return rgb * (luma_limit / largest.clamp_min(1e-12)).clamp(max=1.0)


# --------------------------------------------------------------------------------------------------
# the preset budgets, and the DSSIM cap


@dataclass(frozen=True)
class CloakBudget:
    """How much a cloak may change a face, and how far it aims to move it.

    Attributes:
        max_dssim: cap on DSSIM over the face: its detection box and the region around it, each
            (`facecloak.cloak.base.MEASURED_ON`); enforced by scaling the change down.
        max_linf: cap on any pixel's change, in 1/255 units (enforced by clipping).
        steps: most optimisation steps per face (faces that reach their aim stop early).
        aim: distance to reach on every model, as a multiple of its match threshold, under
            simulated uploads. Above 1 leaves a margin for a scraper's own pipeline.
        step_size: Adam learning rate, in 1/255 units.
        jnd_scale: per-pixel brightness allowance as a multiple of the face's just-noticeable
            difference (`facecloak.cloak.budget.jnd_map`); None: a flat ``max_linf`` everywhere.
        chroma_share: colour (Cb, Cr) changes may be at most this share of the brightness allowance.
        max_ciede: cap on the mean CIEDE2000 colour difference over the face (as DSSIM), or None; a face
            over it has its colour change (not its brightness change) scaled down
            (`Cloak._limit_colour`), so ``chroma_share`` gives colour where a face takes it unseen.
        extra_steps: with the budget spent (``spend_budget``), more steps for the faces still near
            their reference on some model (`facecloak.cloak.base.EXTRA_STEPS_BELOW`).
    """

    max_dssim: float
    max_linf: float
    steps: int
    aim: float
    step_size: float
    jnd_scale: float | None = None
    chroma_share: float = 0.35
    max_ciede: float | None = None
    extra_steps: int = 0


MID_CHROMA_SHARE = 0.2
MID_MAX_CIEDE = 1.4
"""`mid` allows colour changes of up to a fifth of the brightness allowance, under a mean CIEDE2000
of 1.4 over the face (the issue's goal: 1.5). On the leave-one-out ablation (12 people, HSE
MobileNet never seen) a share of 0.2 moved the unseen model 0.88 thresholds instead of 0.82, at
CIEDE2000 1.32 instead of 1.00; on the astronaut sample it reached 1.71 uncapped."""

MID_EXTRA_STEPS = 20
"""`mid`'s extra steps for a face some attacked model still sees near its reference once the 40 are
spent (`facecloak.cloak.base.EXTRA_STEPS_BELOW`). With dlib-resnet, MobileFace and the HSE
MobileNet attacked, on three sets of 48 LFW photos (`scripts/probe_transfer.py --photos 48 --seed
2|3|4`), faces past every model after JPEG 75: 104 -> 118 of 144, for 9-19% more time; 20 more
gave none. With the laggard in every extra step (`facecloak.cloak.base._with_laggard`): 126.
`low` gains no face (none of 48 passes all three models at low), `high` passes 47 of 48 without
them."""

LEVELS: dict[str, CloakBudget] = {
    "low": CloakBudget(
        max_dssim=0.004, max_linf=12.0, steps=40, aim=1.3, step_size=1.0, jnd_scale=1.0, chroma_share=0.1
    ),
    "mid": CloakBudget(
        max_dssim=0.008,
        max_linf=16.0,
        steps=40,
        aim=1.5,
        step_size=1.25,
        jnd_scale=1.6,
        chroma_share=MID_CHROMA_SHARE,
        max_ciede=MID_MAX_CIEDE,
        extra_steps=MID_EXTRA_STEPS,
    ),
    "high": CloakBudget(
        max_dssim=0.012, max_linf=20.0, steps=50, aim=1.8, step_size=1.5, jnd_scale=2.0, chroma_share=0.1
    ),
}
"""Preset budgets by name, defined by what a person sees (README: "How the cloak works"): low is
not seen at 200% zoom, mid not at 100%, high is faint at 100%. Explicit keywords to `Cloak`
override single fields."""

STRONGER_LEVEL = {"low": "mid", "mid": "high"}
"""The level a face that fell short is cloaked again at, with ``--escalate``."""

LEGACY_LEVELS: dict[str, CloakBudget] = {
    "low": CloakBudget(max_dssim=0.004, max_linf=12.0, steps=40, aim=1.3, step_size=1.0),
    "mid": CloakBudget(max_dssim=0.012, max_linf=24.0, steps=40, aim=1.5, step_size=1.25),
    "high": CloakBudget(max_dssim=0.017, max_linf=32.0, steps=50, aim=1.8, step_size=1.5),
}
"""The flat-budget levels of facecloak 0.1 (per-pixel L-infinity cap, no JND map), kept for
comparison in the ablation (`scripts/ablate_transfer.py`)."""


DSSIM_SAFETY = 0.98
"""Enforce the DSSIM cap with this much headroom: the optimisation's hard cap works on unrounded
changes, and a JPEG written by editing only the changed blocks re-quantises them."""


def enforce_dssim(
    crops: Tensor,
    masks: Tensor,
    delta: Tensor,
    boxes: Tensor,
    cap: float,
    *,
    reference: tuple[Tensor, Tensor] | None = None,
    shares: Sequence[float] | None = None,
) -> Tensor:
    """Scale each face's change down until its DSSIM over its boxes is within ``cap``.

    Args:
        crops: (n, 3, h, w) clean crops in [0, 1].
        masks: (n, 1, h, w) feathered region masks the change is applied through.
        delta: (n, 3, h, w) the change.
        boxes: (n, 4) or (n, K, 4) integer boxes inside each crop, the cap holding on each
            (`facecloak.quality.box_dssim`).
        cap: the largest DSSIM allowed.
        reference: `facecloak.quality.reference_means` of ``crops``, if already computed.
        shares: with K boxes a crop, each box's share of ``cap`` (`facecloak.quality.box_dssim`).

    Returns:
        ``delta``, each face's row multiplied by nearly the largest factor in [0, 1] that fits (1
        for faces already within the cap; `largest_factor_under_cap`).
    """
    measured = quality.box_dssim(crops, (crops + masks * delta).clamp(0, 1), boxes, reference, shares)
    over = measured > cap
    if not bool(over.any()):
        return delta

    def dssim(factor: Tensor) -> Tensor:
        scaled = (crops + masks * delta * factor.view(-1, 1, 1, 1)).clamp(0, 1)
        return quality.box_dssim(crops, scaled, boxes, reference, shares)

    low = torch.zeros(len(crops), device=crops.device, dtype=measured.dtype)
    factor = largest_factor_under_cap(
        dssim, cap, low, torch.ones_like(low), low_values=low, high_values=measured
    )
    return delta * factor.view(-1, 1, 1, 1).to(delta)


def scale_colour(delta: Tensor, factor: Tensor | float) -> Tensor:
    """A (n, 3, h, w) RGB change with its colour (Cb, Cr) scaled by ``factor`` and its brightness kept.

    ``factor``: a number or (n, 1, 1, 1).
    """
    ycbcr = _change_to_ycbcr(delta)
    factor = torch.as_tensor(factor, dtype=delta.dtype, device=delta.device)
    return _change_to_rgb(torch.cat([ycbcr[:, :1], ycbcr[:, 1:] * factor], dim=1))


CAP_SLACK = 0.01
"""`largest_factor_under_cap` settles a row once a factor that fits measures within this share of
the cap: for a DSSIM, about the square of the change, that is within half a percent of the factor."""

CAP_ROUNDS = 8
"""Most rounds `largest_factor_under_cap` measures (each a batched measure of every row); rows
settle in two to four."""


def largest_factor_under_cap(
    measure: Callable[[Tensor], Tensor],
    cap: float,
    low: Tensor,
    high: Tensor,
    *,
    low_values: Tensor,
    high_values: Tensor,
    power: float = 2.0,
    rounds: int = CAP_ROUNDS,
) -> Tensor:
    """Per row, nearly the largest factor in [low, high] whose ``measure`` stays at or under ``cap``.

    ``measure`` maps (n,) factors to (n,) values that grow with the factor; ``low_values`` and
    ``high_values`` are its values at ``low`` (all at or under ``cap``) and ``high``. Rows whose
    ``high`` fits take it. The others are found by regula falsi on ``factor ** power`` (a DSSIM
    grows about as the square of a small change, so ``power`` 2 makes it nearly linear), in its
    Illinois form (an end kept twice running counts half as far from the cap, so a measure that
    flattens out, e.g. a change clipped to its allowance, still closes in from both sides): each
    round measures, in one batched call, the factor the line through the row's two bracketing
    measurements puts just under the cap, kept at least a twentieth of the bracket from either
    end. A row is settled once a fitting factor measures within `CAP_SLACK` of the cap or its
    bracket is under 1/256 wide; after ``rounds`` rounds, each row gets the largest factor that
    fitted: two to four measures where a bisection to the same precision takes six to eight.
    """
    lo, hi = low.clone(), high.clone()
    m_lo, m_hi = low_values.clone(), high_values.clone()
    fits = m_hi <= cap
    lo = torch.where(fits, hi, lo)
    settled = fits | (m_lo >= (1 - CAP_SLACK) * cap) | (hi - lo < 1 / 256)
    target = (1 - CAP_SLACK / 2) * cap
    weight_lo, weight_hi = torch.ones_like(lo), torch.ones_like(hi)
    last = torch.zeros_like(lo)  # +1: the last round moved hi down, -1: lo up
    for _ in range(rounds):
        if bool(settled.all()):
            break
        u_lo, u_hi = lo**power, hi**power
        below = weight_lo * (target - m_lo).clamp_min(0)
        above = weight_hi * (m_hi - target).clamp_min(0)
        u = u_lo + below / (below + above).clamp_min(1e-12) * (u_hi - u_lo)
        guess = u.clamp_min(0) ** (1 / power)
        margin = (hi - lo) / 20
        guess = torch.minimum(torch.maximum(guess, lo + margin), hi - margin)
        guess = torch.where(settled, lo, guess)
        values = measure(guess)
        ok = (values <= cap) & ~settled
        over = (values > cap) & ~settled
        lo, m_lo = torch.where(ok, guess, lo), torch.where(ok, values, m_lo)
        hi, m_hi = torch.where(over, guess, hi), torch.where(over, values, m_hi)
        weight_lo = torch.where(over, torch.where(last > 0, weight_lo / 2, weight_lo), torch.ones_like(lo))
        weight_hi = torch.where(ok, torch.where(last < 0, weight_hi / 2, weight_hi), torch.ones_like(hi))
        last = torch.where(over, 1.0, torch.where(ok, -1.0, last))
        settled = settled | (m_lo >= (1 - CAP_SLACK) * cap) | (hi - lo < 1 / 256)
    return lo
