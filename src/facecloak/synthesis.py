"""Face synthesis for replacement: several donors mixed into one new face, pasted seamlessly.

Pure tensor functions, the picture-making half of `facecloak.replace` (which picks the donors and
verifies that each new face is nobody's). ``K`` donor faces are warped to their common shape,
aligned densely with each other and averaged, so no single donor is reproduced; the mix is warped
onto the target's five landmarks, given the target's colour (Lab statistics of the skin) and its
low-frequency shading (its lighting), grain-matched, and pasted with a feathered mask whose edge
lies in plain skin: hair, ears, the jaw line and the background are untouched.

Convention:
    - Coordinates are pixels, ``(x, y)``, integer values at pixel centres, as in `facecloak.align`.
    - Donors live in a *canonical chip*: ``CHIP_SIZE_PX`` square, the five landmarks similarity-
      aligned onto `CANONICAL_TEMPLATE` (the ArcFace template, scaled and centred with room for the
      forehead, cheeks and chin).
    - Warps are thin-plate splines through the five landmarks plus a ring of anchors that follow
      the face's similarity transform, so features land exactly on the target's landmarks while
      the warp stays a plain similarity away from the face.

Only the five points every detection carries are used: no 68-point model, so no landmark weights
with a non-commercial licence are involved.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from facecloak.align import align_faces, estimate_similarity, invert_affine, transform_points
from facecloak.models.templates import ARCFACE_TEMPLATE_112
from facecloak.transforms import LUMA_WEIGHTS, downscaled_gaussian_blur, gaussian_blur, to_grey

CHIP_SIZE_PX = 256
"""Side of a donor's canonical chip, in pixels."""

_CHIP_SCALE = 1.6
_CHIP_OFFSET_PX = (38.4, 24.0)
CANONICAL_TEMPLATE = tuple(
    (x * _CHIP_SCALE + _CHIP_OFFSET_PX[0], y * _CHIP_SCALE + _CHIP_OFFSET_PX[1])
    for x, y in ARCFACE_TEMPLATE_112
)
"""Where the five landmarks sit in a canonical chip: eyes 56 px apart, room for forehead and chin."""

CHIP_EYE_DISTANCE_PX = math.dist(CANONICAL_TEMPLATE[0], CANONICAL_TEMPLATE[1])
"""Eye distance in a canonical chip: a new face is made at this scale, so a face whose eyes lie
farther apart in its photo is upscaled from it and holds less fine detail than the photo around it,
unless its donors have detail chips (`DETAIL_SCALE`)."""

DETAIL_SCALE = 2
DETAIL_FROM = 1.25
"""A donor whose eyes lie more than DETAIL_FROM x `CHIP_EYE_DISTANCE_PX` apart in its photo also
keeps a *detail chip*: the same canonical frame at DETAIL_SCALE times the resolution
(`canonical_chips`' ``scale``). Everything is measured and registered on the ordinary chip; only
the pixels of a new face larger than DETAIL_FROM x the chip's eye distance are read from the
detail chips (`synthesize_face`'s ``detail_chips``), so a large face made from large donor photos
is not an upscaled 256 px face."""


def reads_detail_chips(eye_distance_px: float) -> bool:
    """Whether a face whose eyes are this far apart in its photo is read from detail chips."""
    return eye_distance_px > DETAIL_FROM * CHIP_EYE_DISTANCE_PX


@dataclass(frozen=True)
class SynthesisSettings:
    """How a new face is made and pasted; distances are in units of the target's eye distance.

    Attributes:
        mask_half_width: half-width of the replaced region.
        mask_top: how far above the nose tip the region reaches (covers the eyebrows).
        mask_bottom: how far below the nose tip it reaches (covers the lips, stops above the chin).
        mask_exponent: superellipse exponent of the region (2 = ellipse; higher is squarer).
        feather: width of the soft edge, as a fraction of the region's radius.
        shading_sigma: sigma of the low-pass kept from the target (its lighting); larger keeps less
            of the target (more of the new identity), smaller matches its shading more closely.
        shading_from_skin: measure both lightings on skin only (eyes, brows, nostrils and mouth
            filled in from the skin around them, `features_weight`), so the target's features do
            not come back as dark ghosts under the new face's, nor the donors' features go.
        grain: add luminance noise so the new face is as grainy as the target (1) or not (0).
        register: align the donors densely with each other before averaging (sharper mix).
        parts: take each region's fine detail from one donor (eyes, nose, mouth: `part_weights`)
            instead of averaging it, so there are no double edges; no donor gives more than a part.
        part_share: how much each region's coarse structure also leans to its detail donor (0: the
            plain average of all donors; 1: the region is that donor's).
        eye_share: the same for the eyes and brows (donor 0's region; with two donors, its mouth
            too). Averaged eyes of different openness are a smear, and the eyes carry much of a
            face's identity: at 0.8 instead of 0.5, 28, 27 and 55 faces of the README's three
            `scripts/probe_replace.py` sets passed every check, against 26, 27 and 45 (and 23
            and 50 at 1.0), with sharper eyes.
        detail_sigma: the split between structure and detail, in eye distances.
        outlier_delta_e: colour difference (CIE76) from the donors' median beyond which a donor
            gives way to the others at that spot.
        keep_mouth: leave the person's own lips and mouth (`kept_mouth_weight`) and replace the
            rest: the expression stays whole (an open laugh, red lips, teeth) instead of the
            donors' mouths of another openness, which mix into a dark or blurred blob. The lips
            carry a little of the person: fewer new faces pass every check (README).
        far_side_shrink: on a turned face, how much the side turned away narrows per unit of yaw
            (`estimate_pose`), so the new face does not spill onto hair or background there. At 0
            a turned LFW face got a second nose and skin pasted over the curtain behind its far
            cheek; at 1, with near misses finished by a faint cloak, as many faces pass every check
            (151 against 149 of `scripts/probe_replace.py`'s three sets with three recognisers, 155
            both with dlib-resnet alone).
    """

    mask_half_width: float = 1.0
    mask_top: float = 1.3
    mask_bottom: float = 1.12
    mask_exponent: float = 2.5
    feather: float = 0.3
    shading_sigma: float = 0.5
    shading_from_skin: bool = True
    grain: float = 1.0
    register: bool = True
    parts: bool = True
    part_share: float = 0.5
    eye_share: float = 0.8
    detail_sigma: float = 0.12
    outlier_delta_e: float = 12.0
    far_side_shrink: float = 1.0
    keep_mouth: bool = False


# -- geometry ----------------------------------------------------------------------------------


def _template(like: Tensor) -> Tensor:
    return torch.tensor(CANONICAL_TEMPLATE, dtype=like.dtype, device=like.device)


def eye_distance(landmarks: Tensor) -> Tensor:
    """(N,) distance between the eye centres of (N, 5, 2) landmarks."""
    return (landmarks[:, 1] - landmarks[:, 0]).norm(dim=-1)


def estimate_pose(landmarks: Tensor) -> Tensor:
    """(N, 3) rough ``yaw, pitch, roll`` of faces from their five landmarks.

    ``roll`` is the eye line's angle in radians. After undoing it, ``yaw`` is how far the nose tip
    sits beside the midpoint of the eyes and mouth, in eye distances (0 frontal, positive when the
    nose points to the viewer's right), and ``pitch`` how far the nose tip sits below the middle of
    eyes and mouth, relative to a frontal face (positive: looking down). Proxies, not angles: they
    rank donors by pose.

    Example:
        >>> estimate_pose(torch.tensor([CANONICAL_TEMPLATE])).abs().amax() < 0.05
        tensor(True)
    """
    eyes = landmarks[:, 1] - landmarks[:, 0]
    roll = torch.atan2(eyes[:, 1], eyes[:, 0])
    cos, sin = torch.cos(-roll), torch.sin(-roll)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
    points = (landmarks - landmarks[:, :2].mean(1, keepdim=True)) @ rotation.transpose(1, 2)
    points = points / eyes.norm(dim=-1).clamp_min(1e-6)[:, None, None]
    centre_x = (points[:, 0, 0] + points[:, 1, 0] + points[:, 3, 0] + points[:, 4, 0]) / 4
    yaw = points[:, 2, 0] - centre_x
    mouth_y = (points[:, 3, 1] + points[:, 4, 1]) / 2  # eyes are at y = 0
    frontal = torch.tensor(CANONICAL_TEMPLATE)
    frontal_ratio = float(
        (frontal[2, 1] - frontal[:2, 1].mean()) / (frontal[3:, 1].mean() - frontal[:2, 1].mean())
    )
    pitch = points[:, 2, 1] / mouth_y.clamp_min(1e-6) - frontal_ratio
    return torch.stack([yaw, pitch, roll], dim=1)


def canonical_chips(
    images: Tensor, landmarks: Tensor, image_index: Tensor, scale: int = 1
) -> tuple[Tensor, Tensor]:
    """Cut (N, 3, S, S) canonical chips of faces, and their landmarks in chip pixels (N, 5, 2).

    Args:
        images: (B, 3, H, W) in [0, 1].
        landmarks: (N, 5, 2) in image pixels.
        image_index: (N,) which image each face is in.
        scale: cut detail chips of ``scale`` x `CHIP_SIZE_PX` instead (the same frame, finer); the
            landmarks returned stay in ordinary chip pixels.
    """
    chip_from_image = estimate_similarity(landmarks.double(), _template(landmarks).double()).float()
    cut = chip_from_image
    if scale != 1:  # pixel centres: ordinary chip pixel x lies at scale * x + (scale - 1) / 2
        cut = torch.cat(
            [chip_from_image[:, :, :2] * scale, chip_from_image[:, :, 2:] * scale + (scale - 1) / 2], 2
        )
    chips = align_faces(images, cut, image_index, CHIP_SIZE_PX * scale)
    return chips.clamp(0, 1), transform_points(chip_from_image, landmarks.float())


def mirror_chips(chips: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror canonical chips left-right; landmarks follow, swapped so "left" stays the viewer's left.

    Detail chips mirror the same way (their landmarks are ordinary chip pixels too).
    """
    mirrored = points.clone()
    mirrored[..., 0] = CHIP_SIZE_PX - 1 - points[..., 0]
    return chips.flip(-1), mirrored[:, [1, 0, 2, 4, 3]]


def _superellipse_radius(
    xs: Tensor, ys: Tensor, settings: SynthesisSettings, unit: float, yaw: float = 0.0
) -> Tensor:
    """Normalised radius (1 on the edge) of the replaced region around the nose tip, in canonical pixels.

    On a face turned by ``yaw`` (`estimate_pose`), the side turned away is foreshortened: its
    half of the region narrows by ``far_side_shrink`` x |yaw|, so it ends on the cheek, not on
    the hair or background behind it.
    """
    template = CANONICAL_TEMPLATE
    centre_x = (template[0][0] + template[1][0]) / 2
    centre_y = template[2][1]
    far = max(0.5, 1.0 - settings.far_side_shrink * abs(yaw))
    far_side = (xs - centre_x) * (1.0 if yaw >= 0 else -1.0) > 0  # yaw > 0: nose to the right
    half_width = torch.where(far_side, far, 1.0) * settings.mask_half_width * unit
    dx = (xs - centre_x).abs() / half_width
    reach = torch.where(ys < centre_y, settings.mask_top * unit, settings.mask_bottom * unit)
    dy = (ys - centre_y).abs() / reach
    exponent = settings.mask_exponent
    return (dx.pow(exponent) + dy.pow(exponent)).pow(1.0 / exponent)


def region_weight(points: Tensor, settings: SynthesisSettings, yaw: float = 0.0) -> Tensor:
    """Blend weight (1 inside, feathered to 0 at the edge) at canonical-chip ``points`` (..., 2)."""
    unit = float(torch.tensor(CANONICAL_TEMPLATE)[:2].diff(dim=0).norm())
    radius = _superellipse_radius(points[..., 0], points[..., 1], settings, unit, yaw)
    return ((1.0 - radius) / settings.feather).clamp(0, 1)


def skin_weight(points: Tensor) -> Tensor:
    """Weight of plain skin (the cheeks and the bridge of the nose) at canonical-chip ``points``.

    Where colour statistics are measured: no eyes, brows, lips or nostrils.
    """
    template = torch.tensor(CANONICAL_TEMPLATE, dtype=points.dtype, device=points.device)
    unit = float((template[1] - template[0]).norm())
    weight = torch.zeros(points.shape[:-1], dtype=points.dtype, device=points.device)
    centres = [
        (template[0, 0] - 0.05 * unit, template[0, 1] + 0.55 * unit, 0.28, 0.2),
        (template[1, 0] + 0.05 * unit, template[1, 1] + 0.55 * unit, 0.28, 0.2),
        ((template[0, 0] + template[1, 0]) / 2, template[0, 1] + 0.05 * unit, 0.12, 0.15),
    ]
    for cx, cy, rx, ry in centres:
        inside = ((points[..., 0] - cx) / (rx * unit)).square() + (
            (points[..., 1] - cy) / (ry * unit)
        ).square()
        weight = torch.maximum(weight, (inside < 1).to(points.dtype))
    return weight


def _anchor_ring(like: Tensor, count: int = 16) -> Tensor:
    """(count, 2) anchors on a wide ellipse around the face in the canonical chip (they never move)."""
    template = _template(like)
    unit = float((template[1] - template[0]).norm())
    angles = torch.arange(count, dtype=like.dtype, device=like.device) * (2 * math.pi / count)
    centre_x, centre_y = float(template[:2, 0].mean()), float(template[2, 1])
    return torch.stack(
        [centre_x + 2.2 * unit * torch.cos(angles), centre_y + 2.5 * unit * torch.sin(angles)], -1
    )


# -- thin-plate splines ------------------------------------------------------------------------


def _tps_kernel(a: Tensor, b: Tensor) -> Tensor:
    squared = torch.cdist(a, b).square()
    return squared * torch.log(squared.clamp_min(1e-12))


def fit_thin_plate(source: Tensor, target: Tensor, regularisation: float = 1e-3) -> Tensor:
    """Thin-plate spline taking control points ``source`` (N, P, 2) to ``target`` (N, P, 2).

    Returns:
        (N, P + 3, 2) coefficients for `apply_thin_plate`: P kernel weights, then the affine part.

    Example:
        >>> points = torch.rand(1, 6, 2) * 100
        >>> params = fit_thin_plate(points, points + 3.0)
        >>> torch.allclose(apply_thin_plate(params, points, points), points + 3.0, atol=1e-3)
        True
    """
    n, p, _ = source.shape
    source64, target64 = source.double(), target.double()
    scale = source64.flatten(1).std(1).clamp_min(1e-6)[:, None, None]  # well-conditioned units
    kernel = _tps_kernel(source64 / scale, source64 / scale)
    kernel = kernel + regularisation * torch.eye(p, dtype=torch.float64, device=source.device)
    ones = torch.ones(n, p, 1, dtype=torch.float64, device=source.device)
    affine = torch.cat([ones, source64 / scale], dim=2)
    system = torch.zeros(n, p + 3, p + 3, dtype=torch.float64, device=source.device)
    system[:, :p, :p] = kernel
    system[:, :p, p:] = affine
    system[:, p:, :p] = affine.transpose(1, 2)
    values = torch.cat([target64, torch.zeros(n, 3, 2, dtype=torch.float64, device=source.device)], 1)
    params = torch.linalg.solve(system, values)
    return torch.cat([params, scale.expand(n, 1, 2)], dim=1).to(source.dtype)


def apply_thin_plate(params: Tensor, source: Tensor, points: Tensor) -> Tensor:
    """Map (N, M, 2) ``points`` through splines from `fit_thin_plate` fitted on ``source`` (N, P, 2)."""
    p = source.shape[1]
    scale = params[:, -1:, :1].to(points.dtype)
    weights, affine = params[:, :p], params[:, p : p + 3]
    unit_points, unit_source = points / scale, source.to(points.dtype) / scale
    ones = torch.ones(*points.shape[:2], 1, dtype=points.dtype, device=points.device)
    return torch.cat([ones, unit_points], 2) @ affine + _tps_kernel(unit_points, unit_source) @ weights


# -- aligning the donors with each other -------------------------------------------------------

_WINDOW_PX = (56, 40, 200, 220)
"""``x0, y0, x1, y1`` of the canonical chip that holds the replaced region, with a margin."""

_FIELD_STEP_PX = 2
"""Donor warps are kept on a lattice this many chip pixels apart (they are smooth)."""


def _window_grid(like: Tensor, step: float = 1.0) -> Tensor:
    """(h, w, 2) canonical-chip pixel centres of the window, every ``step`` pixels."""
    x0, y0, x1, y1 = _WINDOW_PX
    xs = torch.arange(x0, x1, step, dtype=like.dtype, device=like.device)
    ys = torch.arange(y0, y1, step, dtype=like.dtype, device=like.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], -1)


def window_outside_share(landmarks: Tensor, width: Tensor | int, height: Tensor | int) -> Tensor:
    """(N,) share of each face's replaced region (its chip's window) that lies outside its photo.

    A face at the photo's edge can be detected with landmarks beyond it; its canonical chip is
    then black where the photo ends, and as a donor it would mix that black, or the wrong person
    beside it, into new faces. ``landmarks``: (N, 5, 2) in pixels of photos ``width`` x ``height``
    (one size, or (N,) each).

    Example:
        >>> inside = torch.tensor([CANONICAL_TEMPLATE])
        >>> float(window_outside_share(inside, CHIP_SIZE_PX, CHIP_SIZE_PX)[0])
        0.0
    """
    if len(landmarks) == 0:
        return torch.zeros(0)
    points = landmarks.double()
    image_from_chip = invert_affine(
        estimate_similarity(points, _template(points).expand(len(points), -1, -1))
    )
    window = _window_grid(points, step=4.0).reshape(1, -1, 2).expand(len(points), -1, -1)
    where = transform_points(image_from_chip, window)
    # pixel centres are integers: the photo spans -0.5 .. size - 0.5
    right = torch.as_tensor(width, dtype=points.dtype).reshape(-1, 1) - 0.5
    bottom = torch.as_tensor(height, dtype=points.dtype).reshape(-1, 1) - 0.5
    outside = (where < -0.5).any(-1) | (where[..., 0] > right) | (where[..., 1] > bottom)
    return outside.double().mean(1).float()


def _sample(images: Tensor, points: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear samples of (N, C, h, w) ``images`` at pixel ``points`` (N, H, W, 2); border padding."""
    height, width = size
    normalised = torch.stack(
        [(2.0 * points[..., 0] + 1.0) / width - 1.0, (2.0 * points[..., 1] + 1.0) / height - 1.0], -1
    )
    return F.grid_sample(images, normalised, mode="bilinear", padding_mode="border", align_corners=False)


def donor_warps(
    mean_points: Tensor,
    donor_points: Tensor,
    chips: Tensor,
    register: bool = True,
    *,
    luminance: Tensor | None = None,
) -> Tensor:
    """Where each donor's chip is read for every window pixel of the common (mean) shape.

    A thin-plate spline takes the mean landmarks to each donor's; then, with ``register``, a
    groupwise demons registration (`register_groupwise`) lines up what five points cannot (brows,
    nostrils, lips, eyelids), so the average of the donors is sharp instead of a double exposure.

    Args:
        mean_points: (5, 2) the common shape, canonical-chip pixels; or (G, 5, 2), one per group.
        donor_points: (K, 5, 2) each donor's landmarks in its chip; or (G, K, 5, 2): G groups of
            K donors (several new faces at once: the same result as one call per group, faster).
        chips: (K, 3, S, S) the donors' canonical chips; or (G, K, 3, S, S).
        register: refine the spline with dense registration.
        luminance: the chips' `registration_luminance`, (K, ...) or (G, K, ...), if already known.

    Returns:
        (K, h, w, 2) donor-chip coordinates on the window's lattice (`_WINDOW_PX`, every
        `_FIELD_STEP_PX` pixels); (G, K, h, w, 2) for groups.
    """
    grouped = donor_points.ndim == 4
    if not grouped:
        known = None if luminance is None else luminance[None]
        return donor_warps(mean_points[None], donor_points[None], chips[None], register, luminance=known)[0]
    groups, k = donor_points.shape[:2]
    donor_points = donor_points.flatten(0, 1)
    ring = _anchor_ring(donor_points)[None].expand(groups * k, -1, -1)
    means = mean_points[:, None].expand(-1, k, -1, -1).flatten(0, 1)
    control = torch.cat([means, ring], 1)
    splines = fit_thin_plate(control, torch.cat([donor_points, ring], 1))
    grid = _window_grid(donor_points, _FIELD_STEP_PX)
    height, width = grid.shape[:2]
    coords = apply_thin_plate(splines, control, grid.reshape(1, -1, 2).expand(groups * k, -1, -1)).view(
        groups * k, height, width, 2
    )
    if register and k >= 2:
        known = None if luminance is None else luminance.flatten(0, 1)
        flow = register_groupwise(chips.flatten(0, 1), coords, group_size=k, luminance=known)
        local = torch.stack(
            torch.meshgrid(
                torch.arange(height, dtype=coords.dtype, device=coords.device),
                torch.arange(width, dtype=coords.dtype, device=coords.device),
                indexing="ij",
            )[::-1],
            -1,
        )
        moved = local[None] + flow.permute(0, 2, 3, 1)
        coords = _sample(coords.permute(0, 3, 1, 2), moved, (height, width)).permute(0, 2, 3, 1)
    return coords.view(groups, k, height, width, 2)


def _luminance(chips: Tensor) -> Tensor:
    weights = torch.tensor(LUMA_WEIGHTS, dtype=chips.dtype, device=chips.device)
    return (chips * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _structure(gray: Tensor, sigma: float) -> Tensor:
    """Local contrast normalisation: structure without each donor's lighting and skin tone."""
    centred = gray - gaussian_blur(gray, sigma)
    spread = gaussian_blur(centred.square(), sigma).clamp_min(1e-8).sqrt()
    return centred / (spread + 0.02)


def _gradients(image: Tensor) -> tuple[Tensor, Tensor]:
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    return (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2, (
        padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]
    ) / 2


def _group_mean(x: Tensor, group_size: int) -> Tensor:
    """Each row replaced by the mean of its group (consecutive runs of ``group_size`` rows)."""
    grouped = x.view(-1, group_size, *x.shape[1:])
    return grouped.mean(1, keepdim=True).expand_as(grouped).reshape(x.shape)


REGISTRATION_LEVELS = (0.25, 0.5)
"""Resolutions of the groupwise registration, as fractions of the lattice's, coarse to fine."""


def _registration_window() -> tuple[int, int, int, int]:
    """``left, top, right, bottom`` of the chip part the registration reads (window and bend room)."""
    return max(0, _WINDOW_PX[0] - 32), max(0, _WINDOW_PX[1] - 32), _WINDOW_PX[2] + 32, _WINDOW_PX[3] + 32


def registration_luminance(chips: Tensor, levels: tuple[float, ...] = REGISTRATION_LEVELS) -> Tensor:
    """(K, len(levels), h, w) what `register_groupwise` reads of (K, 3, S, S) chips, per level.

    The luminance of the part it reads, low-passed for each level's spacing. It depends on the
    chip alone, so a caller that registers the same donors again and again computes it once.
    """
    left, top, right, bottom = _registration_window()
    gray = _luminance(chips[..., top:bottom, left:right])
    return torch.cat([gaussian_blur(gray, 0.5 * _FIELD_STEP_PX / level) for level in levels], 1)


def register_groupwise(
    chips: Tensor,
    coords: Tensor,
    levels: tuple[float, ...] = REGISTRATION_LEVELS,
    iterations: tuple[int, ...] = (16, 6),
    *,
    group_size: int | None = None,
    luminance: Tensor | None = None,
) -> Tensor:
    """Groupwise demons registration (Thirion 1998): displacements that align donors to their mean.

    Coarse to fine, each donor's structure image (lighting removed) is pulled toward the group's
    mean by the demons force; the displacement is smoothed every step (a smooth, plausible warp)
    and the group's mean displacement removed, so the common shape stays the landmarks' mean.

    Args:
        chips: (K, 3, S, S) canonical chips.
        coords: (K, h, w, 2) where each donor is read for the window's pixels (spline only).
        levels: resolutions, as fractions of the lattice's, coarse to fine.
        iterations: demons steps at each level.
        group_size: the rows form groups of this many donors, each registered on its own (several
            new faces in one call); default: one group of all K.
        luminance: the chips' `registration_luminance` at ``levels``, if already computed.

    Returns:
        (K, 2, h, w) displacement, in lattice steps, to add before reading ``coords``.
    """
    k, height, width, _ = coords.shape
    group_size = k if group_size is None else group_size
    # only the part of the chips the window reads (with room for the spline's bend)
    if luminance is None:
        luminance = registration_luminance(chips, levels)
    left, top = _registration_window()[:2]
    coords = coords - torch.tensor([left, top], dtype=coords.dtype, device=coords.device)
    flow = None
    for index, (level, count) in enumerate(zip(levels, iterations)):
        size = (max(8, round(height * level)), max(8, round(width * level)))
        coarse = F.interpolate(coords.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
        blurred = luminance[:, index : index + 1]
        moving = _structure(_sample(blurred, coarse.permute(0, 2, 3, 1), blurred.shape[-2:]), 3.0)
        if flow is None:
            flow = moving.new_zeros(k, 2, *size)
        else:
            flow = F.interpolate(flow, size=size, mode="bilinear", align_corners=False) * (
                size[1] / flow.shape[-1]
            )
        ys, xs = torch.meshgrid(
            torch.arange(size[0], dtype=luminance.dtype, device=luminance.device),
            torch.arange(size[1], dtype=luminance.dtype, device=luminance.device),
            indexing="ij",
        )
        base = torch.stack([xs, ys], -1)[None]
        for _ in range(count):
            warped = _sample(moving, base + flow.permute(0, 2, 3, 1), size)
            difference = warped - _group_mean(warped, group_size)
            grad_x, grad_y = _gradients(warped)
            denominator = grad_x.square() + grad_y.square() + difference.square() + 1e-3
            flow = flow - difference * torch.cat([grad_x, grad_y], 1) / denominator
            flow = _smooth(flow - _group_mean(flow, group_size))
    return F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False) * (
        width / flow.shape[-1]
    )


def _smooth(field: Tensor) -> Tensor:
    """A cheap Gaussian-like smoothing (two 3x3 box filters, sigma about 1.2 px)."""
    for _ in range(2):
        field = F.avg_pool2d(F.pad(field, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return field


def sample_donors(chips: Tensor, warps: Tensor, points: Tensor) -> Tensor:
    """(K, 3, H, W) donors read at canonical-chip ``points`` (1, H, W, 2) through lattice ``warps``.

    ``chips``: (K, 3, S, S) ordinary chips, or detail chips (a multiple of `CHIP_SIZE_PX`), read at
    the same places.
    """
    x0, y0 = _WINDOW_PX[:2]
    k, height, width, _ = warps.shape
    origin = torch.tensor([x0, y0], dtype=points.dtype, device=points.device)
    local = ((points - origin) / _FIELD_STEP_PX).expand(k, -1, -1, -1)
    coords = _sample(warps.permute(0, 3, 1, 2), local, (height, width)).permute(0, 2, 3, 1)
    scale = chips.shape[-1] / CHIP_SIZE_PX
    if scale != 1:
        coords = coords * scale + (scale - 1) / 2
    return _sample(chips, coords, chips.shape[-2:])


def _dense(
    field_at: Callable[[Tensor], Tensor], box: tuple[int, int, int, int], step: int, like: Tensor
) -> Tensor:
    """(1, h, w, 2) smooth map ``field_at`` ((1, M, 2) -> (1, M, 2)) over pixel ``box``.

    Evaluated on a lattice ``step`` pixels apart and interpolated bilinearly in between.
    """
    x0, y0, x1, y1 = box
    columns, rows = math.ceil((x1 - 1 - x0) / step) + 1, math.ceil((y1 - 1 - y0) / step) + 1
    ys, xs = torch.meshgrid(
        y0 + step * torch.arange(rows, dtype=like.dtype, device=like.device),
        x0 + step * torch.arange(columns, dtype=like.dtype, device=like.device),
        indexing="ij",
    )
    lattice = field_at(torch.stack([xs, ys], -1).reshape(1, -1, 2)).view(1, rows, columns, 2)
    if step == 1:
        return lattice
    fine_y, fine_x = torch.meshgrid(
        torch.arange(y1 - y0, dtype=like.dtype, device=like.device) / step,
        torch.arange(x1 - x0, dtype=like.dtype, device=like.device) / step,
        indexing="ij",
    )
    fine = torch.stack([fine_x, fine_y], -1)[None]
    return _sample(lattice.permute(0, 3, 1, 2), fine, (rows, columns)).permute(0, 2, 3, 1)


# -- colour ------------------------------------------------------------------------------------

_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.950456, 1.0, 1.088754)
_DELTA = 6.0 / 29.0


def _power(x: Tensor, exponent: float) -> Tensor:
    """``x ** exponent`` for x >= 0, as ``exp(exponent * log x)``.

    The same values to about 1e-7, twice as fast as a float ``pow`` on the CPU (the Lab
    conversions run at every try of a face).
    """
    return x.clamp_min(1e-12).log().mul_(exponent).exp_()


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """Convert sRGB (B, 3, H, W) in [0, 1] to CIE Lab (D65): L in [0, 100], a and b around 0.

    Example:
        >>> x = torch.rand(1, 3, 4, 4)
        >>> torch.allclose(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-4)
        True
    """
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, _power((rgb.clamp_min(0) + 0.055) / 1.055, 2.4))
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    f = torch.where(xyz > _DELTA**3, _power(xyz, 1.0 / 3.0), xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    return torch.stack([116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])], 1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE Lab (D65) -> sRGB (B, 3, H, W), clipped to [0, 1]."""
    fy = (lab[:, 0] + 16.0) / 116.0
    f = torch.stack([fy + lab[:, 1] / 500.0, fy, fy - lab[:, 2] / 200.0], 1)
    xyz = torch.where(f > _DELTA, f.pow(3), 3 * _DELTA**2 * (f - 4.0 / 29.0))
    xyz = xyz * torch.tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    matrix = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab)
    linear = torch.einsum("ij,bjhw->bihw", matrix, xyz).clamp(0, 1)
    gamma = 1.055 * _power(linear, 1.0 / 2.4) - 0.055
    return torch.where(linear <= 0.0031308, linear * 12.92, gamma).clamp(0, 1)


def weighted_moments(values: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel weighted mean and standard deviation of (B, C, H, W) over (B, 1, H, W) weights."""
    total = weight.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    mean = (values * weight).sum(dim=(2, 3), keepdim=True) / total
    variance = ((values - mean).square() * weight).sum(dim=(2, 3), keepdim=True) / total
    return mean, variance.clamp_min(1e-8).sqrt()


def _ellipses(points: Tensor, ellipses: list[tuple[float, float, float, float]]) -> Tensor:
    """1 inside any of ``(centre_x, centre_y, radius_x, radius_y)`` (canonical pixels), else 0."""
    weight = torch.zeros(points.shape[:-1], dtype=points.dtype, device=points.device)
    for cx, cy, rx, ry in ellipses:
        inside = ((points[..., 0] - cx) / rx).square() + ((points[..., 1] - cy) / ry).square()
        weight = torch.maximum(weight, (inside < 1).to(points.dtype))
    return weight


def features_weight(points: Tensor) -> Tensor:
    """1 on the eyes with their brows, the nostrils and the mouth at canonical-chip ``points``, else 0.

    What is not lighting: `_match_and_blend` measures a face's shading around these parts.
    """
    (left_x, left_y), (right_x, right_y), (nose_x, nose_y), _, _ = CANONICAL_TEMPLATE
    unit = right_x - left_x
    mouth_x, mouth_y = (CANONICAL_TEMPLATE[3][0] + CANONICAL_TEMPLATE[4][0]) / 2, CANONICAL_TEMPLATE[3][1]
    return _ellipses(
        points,
        [
            (left_x, left_y - 0.12 * unit, 0.36 * unit, 0.3 * unit),
            (right_x, right_y - 0.12 * unit, 0.36 * unit, 0.3 * unit),
            (nose_x, nose_y + 0.04 * unit, 0.24 * unit, 0.12 * unit),
            (mouth_x, mouth_y, 0.5 * unit, 0.2 * unit),
        ],
    )


def lower_face_weight(points: Tensor) -> Tensor:
    """Weight of the upper lip and the chin at canonical-chip ``points``: where beards grow."""
    (_, eye_y), _, (nose_x, nose_y), (_, mouth_y), _ = CANONICAL_TEMPLATE
    unit = CANONICAL_TEMPLATE[1][0] - CANONICAL_TEMPLATE[0][0]
    return _ellipses(
        points,
        [
            (nose_x, (nose_y + mouth_y) / 2, 0.3 * unit, 0.09 * unit),
            (nose_x, mouth_y + 0.45 * unit, 0.3 * unit, 0.12 * unit),
        ],
    )


def mouth_weight(points: Tensor) -> Tensor:
    """Weight of the inside of the mouth (between the corners): lips, or teeth when it is open."""
    (_, _), _, (nose_x, _), (_, mouth_y), _ = CANONICAL_TEMPLATE
    unit = CANONICAL_TEMPLATE[1][0] - CANONICAL_TEMPLATE[0][0]
    return _ellipses(points, [(nose_x, mouth_y + 0.03 * unit, 0.35 * unit, 0.1 * unit)])


KEPT_MOUTH_RADII = (0.55, 0.26)
KEPT_MOUTH_FEATHER = 0.35
"""The lips kept by ``keep_mouth``: an ellipse around the mouth corners, these half-axes (x, y) in
eye distances, feathered over this share of its radius (the corners lie at 0.74 of the width)."""


def kept_mouth_weight(points: Tensor, landmarks: Tensor) -> Tensor:
    """How much of the person's own mouth ``keep_mouth`` keeps at image ``points`` (..., 2), 0-1.

    An ellipse around the mouth corners of the face's five ``landmarks`` (5, 2), in the face's own
    frame (its eye line) and units (its eye distance): the person's lips, wherever the warp puts
    the donors' mouth.
    """
    eyes = landmarks[1] - landmarks[0]
    unit = eyes.norm().clamp_min(1e-6)
    along, across = eyes / unit, torch.stack([-eyes[1], eyes[0]]) / unit  # x along the eyes, y down
    centre = landmarks[3:].mean(0) + 0.02 * unit * across
    offset = points - centre
    radius_x, radius_y = (r * unit for r in KEPT_MOUTH_RADII)
    radius = ((offset @ along / radius_x).square() + (offset @ across / radius_y).square()).sqrt()
    return ((1.0 - radius) / KEPT_MOUTH_FEATHER).clamp(0, 1)


def eyes_weight(points: Tensor) -> Tensor:
    """Weight of the two eyes (lids and sockets) at canonical-chip ``points``."""
    (left_x, left_y), (right_x, right_y) = CANONICAL_TEMPLATE[:2]
    unit = right_x - left_x
    return _ellipses(
        points, [(left_x, left_y, 0.28 * unit, 0.13 * unit), (right_x, right_y, 0.28 * unit, 0.13 * unit)]
    )


FACE_STATISTICS = ("L", "a", "b", "L_std", "a_std", "b_std", "beard", "mouth", "eyes", "glasses")
"""What `face_statistics` returns per face: Lab mean and spread of the skin; how much darker the
upper lip and chin are than the cheeks (a beard or moustache); how much lighter the inside of the
mouth is than the cheeks (teeth: an open smile); how much lighter the eyes are than the cheeks
(very dark: sunglasses or deep shadow), all in L units; and how strongly the face shows a
spectacle frame (`glasses_strength`, L units)."""

GLASSES_LINE_PX = 3
"""Half-height, in canonical-chip pixels, of the thin horizontal lines `glasses_strength` looks for:
a spectacle frame's bridge and lower rims are a few pixels thick there, a brow's shadow or a
cheek's shading is much broader and barely registers."""


def glasses_strength(lightness: Tensor) -> Tensor:
    """(N,) how strongly (N, 1, S, S) canonical-chip lightness (Lab L) shows a spectacle frame.

    A frame crosses the bridge of the nose between the eyes and runs under each eye as a thin
    line, dark or bright; bare skin there is smooth. Measured as the strongest thin-line response
    (a row's lightness against the rows ``GLASSES_LINE_PX`` above and below, averaged along the
    row) on the bridge, plus the weaker of the two under-eye ones (both rims, not one eye's lid).
    On 296 LFW donors, those above about 12 all wear glasses; bare faces lie mostly under 7.
    """
    (left_x, left_y), (right_x, right_y) = CANONICAL_TEMPLATE[:2]
    unit, eye_y, centre_x = right_x - left_x, (left_y + right_y) / 2, (left_x + right_x) / 2
    d = GLASSES_LINE_PX
    top, bottom = int(eye_y - 0.3 * unit) - d, int(eye_y + 0.55 * unit) + d + 1
    rows = gaussian_blur(lightness[..., top:bottom, :], 0.7)
    line = (rows[..., : -2 * d, :] + rows[..., 2 * d :, :]) / 2 - rows[..., d:-d, :]  # row r: y = top + d + r

    def strongest(x0: float, x1: float, y0: float, y1: float) -> Tensor:
        band = line[..., int(y0) - top - d : int(y1) - top - d, int(x0) : int(x1)]
        return band.mean(-1).abs().flatten(1).amax(1)

    bridge = strongest(centre_x - 0.1 * unit, centre_x + 0.1 * unit, eye_y - 0.3 * unit, eye_y + 0.15 * unit)
    rims = [
        strongest(x - 0.3 * unit, x + 0.3 * unit, eye_y + 0.22 * unit, eye_y + 0.55 * unit)
        for x in (left_x, right_x)
    ]
    return bridge + torch.minimum(*rims)


@functools.lru_cache(maxsize=8)
def _statistics_regions(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """The (1, 1, S, S) skin, lower-face, mouth and eye weights of a canonical chip: fixed, so made once."""
    coords = torch.arange(CHIP_SIZE_PX, dtype=dtype, device=device)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([xs, ys], -1)
    regions = (skin_weight, lower_face_weight, mouth_weight, eyes_weight)
    return tuple(region(points)[None, None] for region in regions)


def face_statistics(chips: Tensor) -> Tensor:
    """(N, 9) colour statistics of canonical chips (`FACE_STATISTICS`), to match donors to a target.

    Example:
        >>> face_statistics(torch.full((1, 3, CHIP_SIZE_PX, CHIP_SIZE_PX), 0.5)).shape
        torch.Size([1, 10])
    """
    skin, lower_face, mouth_region, eye_region = _statistics_regions(chips.dtype, chips.device)
    lab = rgb_to_lab(chips)
    n = len(chips)
    mean, std = weighted_moments(lab, skin.expand(n, 1, -1, -1))
    beard, _ = weighted_moments(lab[:, :1], lower_face.expand(n, 1, -1, -1))
    mouth, _ = weighted_moments(lab[:, :1], mouth_region.expand(n, 1, -1, -1))
    eyes, _ = weighted_moments(lab[:, :1], eye_region.expand(n, 1, -1, -1))
    cheeks = mean[:, :1]
    contrasts = [cheeks - beard, mouth - cheeks, eyes - cheeks]
    glasses = glasses_strength(lab[:, :1])[:, None]
    return torch.cat([mean.flatten(1), std.flatten(1), *(c.flatten(1) for c in contrasts), glasses], 1)


def mouth_width(landmarks: Tensor) -> Tensor:
    """(N,) distance between the mouth corners in eye distances: wider when smiling."""
    return (landmarks[:, 4] - landmarks[:, 3]).norm(dim=-1) / eye_distance(landmarks).clamp_min(1e-6)


def _low_pass(image: Tensor, sigma: float) -> Tensor:
    return downscaled_gaussian_blur(image, sigma) if sigma > 0.3 else image


# -- synthesis ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthesisResult:
    """One new face: where it goes and its pixels.

    Attributes:
        box: ``x0, y0, x1, y1`` of the crop it replaces (x1, y1 exclusive).
        pixels: (3, h, w) the crop with the new face blended in.
        weight: (1, h, w) the blend weight used (1 = new face, 0 = original).
    """

    box: tuple[int, int, int, int]
    pixels: Tensor
    weight: Tensor


def synthesize_face(
    image: Tensor,
    landmarks: Tensor,
    donor_chips: Tensor,
    donor_points: Tensor,
    *,
    settings: SynthesisSettings | None = None,
    generator: torch.Generator | None = None,
    warps: Tensor | None = None,
    detail_chips: Tensor | None = None,
) -> SynthesisResult | None:
    """Blend donors into one new face on ``image``'s face with ``landmarks``; return the new crop.

    Args:
        image: (3, H, W) in [0, 1], the photo (read only).
        landmarks: (5, 2) the target face's landmarks, image pixels.
        donor_chips: (K, 3, S, S) canonical chips of the donors to mix (equal weights).
        donor_points: (K, 5, 2) their landmarks in chip pixels.
        settings: region, feather, shading (defaults: `SynthesisSettings`).
        generator: for the grain noise (reproducible with a seeded generator).
        warps: the donors' `donor_warps`, if already computed (several faces' in one call).
        detail_chips: (K, 3, s*S, s*S) the donors' detail chips (`DETAIL_SCALE`), to read the new
            face's pixels from when the face is larger than the ordinary chip; None: the chips.

    Returns:
        The crop with the new face, or None if the face lies outside the image.
    """
    settings = settings or SynthesisSettings()
    device, dtype = image.device, image.dtype
    height, width = image.shape[-2:]
    template = _template(image)
    target = landmarks.to(device, dtype)[None]
    chip_from_image = estimate_similarity(target.double(), template.double()).to(dtype)
    image_from_chip = invert_affine(chip_from_image.double()).to(dtype)
    unit_px = float(eye_distance(target)[0])  # eye distance in image pixels
    unit_chip = float((template[1] - template[0]).norm())

    # the crop that holds the region, plus a margin for the spline's bend
    edge = torch.tensor(
        [[-1.15, -1.6], [1.15, -1.6], [-1.15, 1.3], [1.15, 1.3]], dtype=dtype, device=device
    ) * unit_chip + torch.stack([template[:2, 0].mean(), template[2, 1]])
    corners = transform_points(image_from_chip, edge[None])[0]
    x0, y0 = max(0, int(corners[:, 0].min())), max(0, int(corners[:, 1].min()))
    x1, y1 = min(width, int(corners[:, 0].max()) + 2), min(height, int(corners[:, 1].max()) + 2)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return None

    # image -> mean shape (chip) -> each donor's chip, through the landmarks and a fixed ring
    ring = _anchor_ring(image)
    mean_shape = donor_points.to(device, dtype).mean(0, keepdim=True)
    ring_image = transform_points(image_from_chip, ring[None])
    image_control = torch.cat([target, ring_image], 1)
    to_mean = fit_thin_plate(image_control, torch.cat([mean_shape, ring[None]], 1))
    step = max(1, min(4, int(unit_px / 12)))
    in_mean = _dense(
        lambda points: apply_thin_plate(to_mean, image_control, points), (x0, y0, x1, y1), step, image
    )
    chips = donor_chips.to(device, dtype)
    if warps is None:
        warps = donor_warps(mean_shape[0], donor_points.to(device, dtype), chips, settings.register)
    to_donors = warps.to(device, dtype)
    chip_px_per_image_px = unit_chip / max(unit_px, 1e-6)
    if detail_chips is not None and reads_detail_chips(unit_px):  # a large face: the finer chips
        chips = detail_chips.to(device, dtype)
    elif chip_px_per_image_px > 1.6:  # the chip is much finer than the target: low-pass where it is read
        wx0, wy0, wx1, wy1 = (
            max(0, _WINDOW_PX[0] - 24),
            max(0, _WINDOW_PX[1] - 24),
            min(CHIP_SIZE_PX, _WINDOW_PX[2] + 24),
            min(CHIP_SIZE_PX, _WINDOW_PX[3] + 24),
        )
        chips = chips.clone()
        chips[..., wy0:wy1, wx0:wx1] = _low_pass(chips[..., wy0:wy1, wx0:wx1], 0.45 * chip_px_per_image_px)
    sampled = sample_donors(chips, to_donors, in_mean)
    parts = part_weights(in_mean[0], len(sampled))[:, None] if settings.parts else None
    if parts is None:
        parts = torch.full_like(sampled[:, :1], 1.0 / len(sampled))
    yaw = float(estimate_pose(target)[0, 0])
    weight = region_weight(in_mean[0], settings, yaw)[None, None]
    if settings.keep_mouth:
        pixels = _dense(lambda points: points, (x0, y0, x1, y1), 1, image)[0]  # the crop's pixel centres
        weight = weight * (1 - kept_mouth_weight(pixels, target[0]))[None, None]
    skin = skin_weight(in_mean[0])[None, None]
    lighting = (1 - features_weight(in_mean[0]))[None, None] if settings.shading_from_skin else None
    original = image[None, :, y0:y1, x0:x1]
    result = _match_and_blend(
        original, sampled, parts, weight, skin, unit_px, settings, generator, lighting=lighting
    )
    if bool(nearly_grey(original)[0]):  # a black-and-white photo: a face of any colour would show at once
        tint = (original - to_grey(original)).mean((2, 3), keepdim=True)  # zero for an exactly grey one
        result = (to_grey(result) + tint).clamp(0, 1)
    return SynthesisResult((x0, y0, x1, y1), result[0], weight[0])


NEARLY_GREY_SPREAD = 6 / 255
"""A crop whose channels differ by at most this (99th percentile) is a black-and-white photo.

A scan stored as a colour JPEG, or a grey photo with a channel's noise, is not exactly grey:
colour matching then kept half the donors' colour (the chroma gain's floor), lips and eyes
tinted on a colourless face. A skin photo's channels differ by 20 levels and more."""


def nearly_grey(images: Tensor) -> Tensor:
    """(B,) whether each (B, 3, H, W) crop is black and white up to noise (`NEARLY_GREY_SPREAD`)."""
    spread = (images.amax(1) - images.amin(1)).flatten(1).float()
    return torch.quantile(spread, 0.99, dim=1) <= NEARLY_GREY_SPREAD


MIN_COLOUR_GAIN = 0.6
MAX_COLOUR_GAIN = 1.0
"""Bounds of the factor that scales a donor's colour spread (a, b over its skin) to the target's.
Never above 1: the spread of skin is small, so a larger factor also enlarged every feature's
colour difference from the skin. At 1.6 (before 2026-12-05) the samples' irises and lids turned
purple and an old woman's lips a vivid pink blob; at 1.0 neither, and as many faces pass every
check (149 of 159 both on three `scripts/probe_replace.py` sets: the defaults, ``--photo 1``, and
``--photo 2 --per-person 2``)."""


CHROMA_GAIN_BOUNDS = (0.5, 2.0)
"""Bounds of the factor that takes a donor's skin chroma (a*, b* over its skin) to the target's.
A gain keeps neutral features neutral where a shift by the skins' difference did not: a warm
donor's grey eye shadow came out blue on the samples' astronaut, whose skin is cooler (b* 25 ->
12 moved grey to b* -13). On `scripts/probe_replace.py`'s three sets (three recognisers, the
first 300 LFW people as donors) 40, 42 and 84 faces of 42, 44 and 88 passed every check, against
40, 43 and 84 with the shift."""


def _match_and_blend(
    original: Tensor,
    donors: Tensor,
    parts: Tensor,
    weight: Tensor,
    skin: Tensor,
    unit_px: float,
    settings: SynthesisSettings,
    generator: torch.Generator | None,
    *,
    lighting: Tensor | None = None,
) -> Tensor:
    """Mix the donors, give the mix the target's colour, shading and grain, feather it in.

    Args:
        original: (1, 3, h, w) the target's crop.
        donors: (K, 3, h, w) the donors, warped onto it.
        parts: (K, 1, h, w) which donor gives the detail where (sums to 1), see `part_weights`.
        weight: (1, 1, h, w) blend weight of the new face.
        skin: (1, 1, h, w) where colour statistics are measured.
        unit_px: the target's eye distance in pixels.
        settings: see `SynthesisSettings`.
        generator: for the grain.
        lighting: (1, 1, h, w) where shading is measured (0 on the features), or None: everywhere.
    """
    target_lab, donor_lab = rgb_to_lab(original), rgb_to_lab(donors)
    if float(skin.sum()) < 8:
        skin = weight
    target_mean, target_std = weighted_moments(target_lab, skin)
    donor_mean, donor_std = weighted_moments(donor_lab, skin.expand(len(donors), -1, -1, -1))
    ratio = (target_std / donor_std).clamp(MIN_COLOUR_GAIN, MAX_COLOUR_GAIN)
    ratio[:, 0] = 1.0  # lightness contrast comes from the shading below, not from the skin's spread
    # every donor in the target's colours: lightness by a shift (its contrast comes from the shading
    # below), a* and b* by a gain (the skins' ratio), so a grey or white feature stays neutral
    chroma_gain = (target_mean[:, 1:] / donor_mean[:, 1:].clamp_min(1.0)).clamp(*CHROMA_GAIN_BOUNDS)
    matched = torch.cat(
        [donor_lab[:, :1] - donor_mean[:, :1] + target_mean[:, :1], donor_lab[:, 1:] * chroma_gain], 1
    )
    donor_lab = (matched - target_mean) * ratio + target_mean
    # structure averaged over all donors; fine detail (eyelids, nostrils, lips) each from one donor
    low = _low_pass(donor_lab, settings.detail_sigma * unit_px)
    # robust mix: a donor unlike the others somewhere (a hand, a microphone, sunglasses, a shadow)
    # gives way there to the others
    typical = low.median(dim=0, keepdim=True).values if len(donors) > 2 else low.mean(0, keepdim=True)
    # (a sum of squares, not Tensor.norm: the same value, several times faster over dim 1 on the CPU)
    deviation = _low_pass((low - typical).square().sum(1, keepdim=True).sqrt(), 0.1 * unit_px)
    trust = torch.exp(-(deviation / settings.outlier_delta_e).square()) + 1e-4
    share = settings.part_share + (settings.eye_share - settings.part_share) * parts[:1]
    structure = (share * parts + (1 - share) / len(donors)) * trust
    detail = parts * trust + 1e-3 * trust
    new_lab = (structure * low).sum(0, keepdim=True) / structure.sum(0, keepdim=True)
    new_lab = new_lab + (detail * (donor_lab - low)).sum(0, keepdim=True) / detail.sum(0, keepdim=True)
    # low frequencies (lighting, skin tone gradients) from the target, the rest from the donors
    sigma = settings.shading_sigma * unit_px
    if sigma > 0.3:
        # both lightings in one call: one blur of the pair, and one of the weight that normalises it
        new_lighting, target_lighting = _shading(torch.cat([new_lab, target_lab]), sigma, lighting)
        new_lab = new_lab - new_lighting + target_lighting
    if settings.grain > 0:
        target_grain = _detail_std(target_lab[:, :1], skin)
        new_grain = _detail_std(new_lab[:, :1], skin)
        missing = settings.grain * min(_MAX_GRAIN_L, math.sqrt(max(0.0, target_grain**2 - new_grain**2)))
        if missing > 0:
            noise = torch.randn(new_lab[:, :1].shape, generator=generator, dtype=new_lab.dtype)
            new_lab[:, :1] += missing * noise.to(new_lab.device)
    new_lab[:, :1] = _highlights_softened(new_lab[:, :1], settings.detail_sigma * unit_px)
    blended = target_lab + weight * (new_lab - target_lab)
    out = lab_to_rgb(blended)
    return torch.where(weight > 0, out, original)


HIGHLIGHT_DETAIL_L = 10.0
HIGHLIGHT_KEEP = 0.25
"""A fine detail brighter than its surroundings by more than HIGHLIGHT_DETAIL_L (L*) keeps
HIGHLIGHT_KEEP of the excess: a donor's specular highlight on a nose, set on the target's own
lighting, came out as a white blob (the samples' group photo with a bank of 27 LFW donors: L* 100
on a nose tip of 73)."""


def _highlights_softened(lightness: Tensor, sigma: float) -> Tensor:
    """``lightness`` (1, 1, h, w) with its sharp bright peaks compressed (`HIGHLIGHT_DETAIL_L`)."""
    if sigma <= 0.3:
        return lightness
    fine = lightness - _low_pass(lightness, sigma)
    return lightness - (1 - HIGHLIGHT_KEEP) * (fine - HIGHLIGHT_DETAIL_L).clamp(min=0)


def part_weights(points: Tensor, count: int, *, softness: float = 0.08) -> Tensor:
    """(count, ...) which donor gives the fine detail at canonical-chip ``points`` (..., 2).

    Donor 0 gives the eyes and brows, donor 1 the nose and cheeks, donor 2 the mouth and chin;
    with two donors, donor 0 also gives the nose and donor 1 the mouth, so that the donor chosen
    for its expression gives the mouth (`FaceReplacer` orders two as pose, then expression: it got
    the nose only). Further donors shape only the average. Transitions are smooth (``softness``
    eye distances), and the weights sum to 1.
    """
    (_, eye_y), _, (_, nose_y), (_, mouth_y), _ = CANONICAL_TEMPLATE
    unit = CANONICAL_TEMPLATE[1][0] - CANONICAL_TEMPLATE[0][0]
    y = points[..., 1]
    below_eyes = torch.sigmoid((y - (eye_y + 0.33 * unit)) / (softness * unit))
    below_nose = torch.sigmoid((y - (nose_y + mouth_y) / 2) / (softness * unit))
    bands = [1 - below_eyes, below_eyes * (1 - below_nose), below_eyes * below_nose]
    weights = torch.zeros((count, *y.shape), dtype=points.dtype, device=points.device)
    givers = (0, 0, 1) if count == 2 else (0, 1 % count, 2 % count)
    for band, donor in zip(bands, givers):
        weights[donor] += band
    return weights


def _shading(lab: Tensor, sigma: float, where: Tensor | None) -> Tensor:
    """Low-pass of ``lab``: its lighting.

    With ``where``, measured there only (a normalised convolution): the features (weight 0) are
    filled in from the skin around them instead of darkening it.
    """
    if where is None:
        return _low_pass(lab, sigma)
    return _low_pass(lab * where, sigma) / _low_pass(where, sigma).clamp_min(1e-3)


_MAX_GRAIN_L = 2.5
"""Most grain (L units) added to a new face: more would be noise, not film grain."""


def _detail_std(lightness: Tensor, weight: Tensor) -> float:
    """Robust spread of the finest detail (pixel minus its 3x3 mean) where ``weight`` > 0.5.

    The median absolute value, scaled to a standard deviation: sensor noise and film grain count,
    the few strong edges of wrinkles, glasses or hair do not.
    """
    detail = lightness - F.avg_pool2d(F.pad(lightness, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    values = detail[weight.expand_as(detail) > 0.5]
    return float(values.abs().median() * 1.4826) if values.numel() else 0.0


def synthesize_faces(
    images: list[Tensor],
    landmarks: Tensor,
    image_index: Tensor,
    donor_chips: list[Tensor],
    donor_points: list[Tensor],
    *,
    settings: SynthesisSettings | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Replace several faces: ``images`` (3, H_i, W_i) each, one donor set per face; returns new images."""
    outputs = [image.clone() for image in images]
    for n in range(len(landmarks)):
        i = int(image_index[n])
        result = synthesize_face(
            images[i], landmarks[n], donor_chips[n], donor_points[n], settings=settings, generator=generator
        )
        if result is not None:
            x0, y0, x1, y1 = result.box
            region = outputs[i][:, y0:y1, x0:x1]
            outputs[i][:, y0:y1, x0:x1] = torch.where(result.weight > 0, result.pixels, region)
    return outputs
