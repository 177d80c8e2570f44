"""Face replacement: every face becomes a new one mixed from donors, and is proved to be nobody's.

The third protection beside cloaking and blurring, for photos that must stay usable as photos
(a blurred face breaks face-detection and crowd-analysis pipelines; a replaced one does not).
Per face:

1. **Pick donors** from a donor bank (`facecloak.donors`): close in pose (a donor may be mirrored)
   and in skin tone, beard and glasses, of the person's kin (the donors nearest the person and
   nearest the donor overlap: `KIN_COST`), not a look-alike of the person (beyond ``look_alike`` x every
   recogniser's threshold), no two of the same identity; among the sets of ``K`` such donors the
   one whose embeddings' mean lies farthest from each donor and from the person is tried first.
2. **Synthesise** (`facecloak.synthesis`): the donors averaged in their common shape, warped onto
   the face's five landmarks, given its colour, shading and grain, pasted with a feathered mask.
3. **Verify, never silently**: the photo is re-encoded as JPEG 75 and faces are detected from
   scratch. The new face must (a) be found again, (b) be beyond every recogniser's match
   threshold (x ``margin``) from the original face and (c) from every donor used (x
   ``donor_margin``). A face that fails is retried with other donors (the donors it matched are
   dropped). After ``attempts`` tries it is blurred instead and reported so (``fallback="blur"``,
   the default: a new face that still matches the person or a donor is never left in the output),
   or its best try is kept and it is reported as NOT protected (``fallback="keep"``).
4. **Finish a near miss or a thin pass** (``finish``): a new face whose best try was found again
   and lies between `FINISH_FROM` and `FINISH_UNTIL` of every margin gets a `low`-level away cloak
   (`facecloak.cloak.away`) that pushes it from the original face and its donors on every
   recogniser, and is checked again as in 3 (one that falls short gets a `mid` one instead). The
   new face already carries nobody's features; the cloak closes the last few percent that the
   person's hair, outline and lighting hold, and moves a face that passed only just far enough
   that a recogniser outside the check does not link it.

Faces smaller than ``min_face`` pixels are blurred instead and reported: too small for a new face
to be checked by a recogniser.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from facecloak import io
from facecloak._checks import check_choice, check_faces, check_image_list, check_seed
from facecloak.anonymize import blur_faces
from facecloak.cloak import AwayCloak
from facecloak.cloak.verify import match_redetected, redetect
from facecloak.defaults import REPLACE_FALLBACKS, VERIFY_JPEG_QUALITY
from facecloak.detect import FaceDetector
from facecloak.donor_bank import DonorBank, bank_folder, load_bank
from facecloak.embed import embed_faces, model_device
from facecloak.errors import InvalidInputError
from facecloak.faces import Faces, check_face_values
from facecloak.models.registry import Embedder, distance_matrix, embedding_distance
from facecloak.synthesis import (
    CHIP_EYE_DISTANCE_PX,
    SynthesisSettings,
    canonical_chips,
    donor_warps,
    estimate_pose,
    eye_distance,
    face_statistics,
    mirror_chips,
    mouth_width,
    reads_detail_chips,
    registration_luminance,
    synthesize_face,
)

REPLACE_MIN_FACE_PX = 40
"""Default smallest face (shorter box side, pixels) that is replaced; smaller ones are blurred."""

DONORS_PER_FACE = 3

REPLACE_ATTEMPTS = 6
"""Donor sets tried per face before the fallback. Most failed tries miss a threshold by a few
percent, so later sets still pass: on three probe sets of 42, 44 and 88 LFW faces checked by
three recognisers, 4 tries replaced 25, 29 and 57 faces, 6 tries 31, 30 and 66 (3.6-3.7 tries per
face instead of 3.0); 7 tries 31 and 31 of the first two (3.9)."""

_SETS_PER_ATTEMPT = 30
"""Donor sets kept per face and attempt, best first (180 of the 364 a pool of 14 gives at 6
attempts): each failed try rules out at most 3 donors, each in about a fifth of the sets."""

MAX_DONOR_SETS = 25_000
"""Most donor sets of one pool that are scored, when a face is planned: the pool is narrowed
(its costliest donors left out) until it gives no more. After a try that fell short the pool
doubles to 28, and at ``--donors-per-face 8`` its 3.1 million sets took 46 s and 7.7 GB to plan
one face, again after every such try (6 donors: 2.6 s and 1.3 GB). A pool of 28 gives 3,276 sets
of 3 donors (the default) and 20,475 of 4: those plans are unchanged."""

_WARP_GROUPS = 16
"""Faces whose donors are registered in one call (bounds the memory of a round)."""

DONOR_MARGIN = 1.08
"""Required distance from each donor used, in thresholds, for a model not in `MEASURED_DONOR_MARGINS`:
more than from the original, because a scraper sees the new face through its own detector and
alignment, not the check's. Two MTCNN pyramids of the same JPEG (the check's and a scraper's
default one) moved a replaced face's distance to its donors by up to 0.076 thresholds on
MobileFace and the HSE MobileNet (150 LFW faces); 1.08 covers that. On LFW (373 faces, README): at
1.05, 1 of 186 replaced subjects matched a donor on MobileFace (at 0.999 of its threshold); at
1.08 none did."""

MEASURED_DONOR_MARGINS = {"dlib-resnet": 1.05}
"""Donor margins of the models whose alignment sensitivity was measured here. dlib-resnet's 150 px
chip with a wide border moves little: 0.012 thresholds between two MTCNN pyramids, 0.039 between
the check and dlib's own C++ pipeline (HOG detector, 68-point alignment; 80 replaced LFW faces);
two evaluator runs at 1.05 found no replaced subject matching a donor on either."""

REPLAN_LANDING = 1.05
REPLAN_WEIGHT = 50.0
"""After a try that stayed too near the person, the weight of a set's predicted landing (up to
REPLAN_LANDING thresholds) against the donors' cost (pose, colour, expression, glasses; a few
units): sets predicted to land farther come first, and among those that land past, the
best-matched ones. (Keeping the first plan's order where no set is predicted to land past
REPLAN_LANDING replaced 22, 20 and 38 faces of the README's three probe sets, against 26, 27 and
45.) At 20, a set landing at 0.97 could come before one landing past 1 when the latter's donors
cost a little more (a donor with faint glasses for a bare face); at 50 that takes a turned donor,
and the three probe sets replace as many faces (150 of 159 both)."""

MAX_YAW_GAP = 0.15
TURNED_DONOR_COST = 10.0
"""A donor turned more than MAX_YAW_GAP (`estimate_pose` yaw, eye distances; mirroring counts)
from the face costs TURNED_DONOR_COST more: used only when the bank has too few others. Five
points cannot warp a profile onto a frontal face: the samples' astronaut got a donor turned by
0.34 (a quarter of the bank's 296 LFW donors are past 0.15 from a frontal face, one in ten past
0.22), whose eyes came out doubled."""

FINISH_FROM = 0.8
FINISH_UNTIL = 1.15
FINISH_LEVELS = ("low", "mid")
FINISH_STEPS = 12
FINISH_SPARE = 1.05
"""A new face whose worst check lies between FINISH_FROM and FINISH_UNTIL of its margin (and was
found again) is finished by FINISH_STEPS steps of an away cloak at the first of FINISH_LEVELS
(`low`: not seen at 200% zoom): a near miss instead of being blurred, a thin pass so that a
recogniser outside the check does not link it (leave-one-out, README: the HSE MobileNet, left out
of the check, linked 7 of 40 probes; with a margin of 1.15 on the other two, 1). A face farther
off is not finished: pushing it across would make the cloak, not the new face, what protects it.
A finished face must pass with FINISH_SPARE to spare: a cloak's distance moves more with the
alignment than a new face's (a finished LFW face read 0.7308 of MobileFace's 0.73 in the check,
0.7075 through a full-pyramid detection of the same JPEG). One that falls short of the spare is
finished again from its unfinished try at the next level (`mid`: not seen at 100%): with `low`
alone, 17 of the README's 373 LFW faces fell short and were blurred.

The finish spends every step and then fills the level's DSSIM cap. Stopping it once the face was
1.15 times past every margin (the original's and each donor's, through the simulated upload) for
two steps running (`AwayCloak(..., spend_budget=False, aim=1.15)`; `AwayCloak.progress`), without
filling the cap, was measured and not kept: on the README's
373 LFW faces it replaced 345 instead of 338, re-detected 0.976 instead of 0.967 and took 0.90 s
a photo instead of 1.48 (6.6 steps on average), but with MobileFace left out of the check 3.1% of
the replaced subjects matched a donor on it, against 0.6% with every step spent (filling the cap
after the early stop: 3.1% too)."""

RESOLUTION_FREE = 1.25
RESOLUTION_COST = 2.0
"""A donor that would be enlarged more than RESOLUTION_FREE times to fill the face (`_held_detail`:
its eye distance in its own photo, or its chip's, against the face's) costs RESOLUTION_COST more
per doubling beyond that: a large face is made from large donor photos where the bank has them,
so it is not an upscaled, soft face. On LFW-sized faces (eyes about 40 px apart) no donor of a
250 px LFW bank pays anything, so the choice there is unchanged."""

NEAR_DONOR_COST = 2.0
"""Extra cost of a donor within ``prefer_beyond`` thresholds of the person (about a pose's worth)."""

GLASSES_COST = 2.0
GLASSES_FROM, GLASSES_TO = 6.0, 12.0
"""A donor whose spectacles differ from the face's costs up to GLASSES_COST more. Each face's
`glasses_strength` (the last of `FACE_STATISTICS`) becomes a likelihood, 0 at GLASSES_FROM or
less, 1 at GLASSES_TO or more (296 LFW donors: all past 12 wear glasses, bare faces lie mostly
under 7). On 40 LFW faces, 7 bare faces were given a ghost of a donor's frames across the eyes
(one, Steve Ballmer, whole glasses), and faces with glasses lost the middle of theirs."""

KIN_SHARE = 1 / 12
"""A donor's kin: the donors among the nearest KIN_SHARE of the bank, in the recognisers' space
(mean distance in thresholds), at least KIN_MIN and at most KIN_MAX of them (a bank of 100,000
keeps 200 MB of kin, not 7 GB; 30,000 donors take 7 s per model to relate, at start)."""
KIN_MIN = 5
KIN_MAX = 256
KIN_ENOUGH = 0.3
KIN_COST = 3.0
"""Donors are matched to a face on what its kin and theirs share (shared nearest neighbours), not
on their distance to it: the donors nearest a face are too near to be used (``look_alike``), and
among the usable ones distance says little of sex, age or origin, while a face's kin and a
donor's overlap when they share them. On 3 LFW women the men chosen before shared 0-4% of their
kin; the women most alike by kin, 40-64%, some of them 0.85 from the face (dlib), far enough to
use. A donor sharing less than KIN_ENOUGH of its kin with the face costs up to KIN_COST (0
shared), which outweighs the reward for a set predicted to land far (at most 2): women were given
men's features to land past the thresholds."""


def glasses_likelihood(strength: Tensor) -> Tensor:
    """How likely faces wear glasses, 0-1, from their `glasses_strength`."""
    return ((strength - GLASSES_FROM) / (GLASSES_TO - GLASSES_FROM)).clamp(0, 1)


@dataclass(frozen=True)
class ReplaceResult:
    """Replaced photos and what happened to each face.

    Attributes:
        images: one (3, H, W) output per input photo.
        records: one dict per face, in ``faces`` order: ``method`` ("replace", or "blur" for a
            face under ``min_face``), ``protected``, ``redetected``, ``attempts``, ``donors`` (ids),
            ``distance_to_original`` and ``distance_to_donors`` (closest donor) per model, the
            detector's confidence before and after, ``donor_upscale`` (the face's eye distance over
            its smallest donor's in their photos, or over the synthesis chip's when that is
            smaller: above about 2 the new face looks soft) and ``detail_limit`` (``"donors"`` or
            ``"chip"``: which of the two it is),
            ``finished`` and ``finish_level`` (the faint cloak of step 4, and its level), and a
            ``reason`` when not protected.
        protected: (N,) bool, every check passed (a blurred tiny face counts as protected).
    """

    images: list[Tensor]
    records: list[dict]
    protected: Tensor


@dataclass
class _Plan:
    """One face's donor sets to try, the donors ruled out, and the best try so far."""

    sets: list[tuple[tuple[int, ...], tuple[bool, ...]]]
    face: tuple = ()  # what `FaceReplacer._donor_sets` needs to plan again: pose, smile, stats, target
    eye_px: float = 0.0  # the face's eye distance in its photo
    draw: int = 0  # the face's place among its photo's faces: what its random draws are seeded by
    excluded: set[int] = field(default_factory=set)
    tried: set[tuple[int, ...]] = field(default_factory=set)
    shrink: Tensor | None = None  # (models,) see `FaceReplacer._shrink`; None before any try fell short
    attempts: int = 0
    best: tuple | None = None  # (score, crop, record)
    done: bool = False


class FaceReplacer:
    """Replaces faces with donor mixes and verifies each one: ``replacer(images, faces)``.

    Args:
        bank: the donor bank (from `facecloak.donor_bank.load_bank`); must be built with ``models``.
        models: the recognisers every new face is checked with (default: every model available
            here, `facecloak.models.available_embedders`); the bank must have been built with
            them, and may hold more (`DonorBank.check_models`).
        donors_per_face: donors mixed into each new face (K). More makes each donor less visible
            and the face more average; 3 is the least that keeps every donor well beyond threshold.
        seed: seed of the donor draw, the grain and the finish. The same seed gives the same output
            for the same photos in a call; a photo replaced beside other photos can differ by a
            few levels where it was finished (the finish's faint cloak draws its random uploads
            for all the call's faces at once, as a cloak does), never in its donors.
        attempts: donor sets tried per face before ``fallback`` applies.
        margin: required distance from the original face, as a multiple of each model's match threshold.
        donor_margin: required distance from each donor used, likewise: one number for every model,
            or None for each model's own (`MEASURED_DONOR_MARGINS`, else `DONOR_MARGIN`).
        look_alike: donors closer than this multiple of a threshold to the person are never used.
        prefer_beyond: donors closer than this are used only when the bank has too few others
            (they cost `NEAR_DONOR_COST` more in the choice).
        min_face: faces with a shorter box side are blurred instead, and reported.
        fallback: a face whose every try failed a check is ``"blur"``-red instead (protected by
            the blur, and reported as such) or ``"keep"``-s its best try (reported NOT protected).
        detector: the detector of the check (default MTCNN on the models' device).
        settings: how faces are synthesised and pasted (`facecloak.synthesis.SynthesisSettings`).
        pool: donors (nearest in pose and colour) among which the sets are chosen.
        affinity: weight of a donor's closeness to the person in the recognisers' space (beyond
            ``look_alike``), so the new face fits the photo; the verification keeps the result
            away from the person. Sex, age and origin are matched on shared kin (`KIN_COST`):
            beyond ``look_alike``, closeness alone says little of them. The new face
            sits on the person's hair, outline and lighting, so donors a little farther from the
            person are what moves it past every threshold: preferring donors beyond 1.3
            (``prefer_beyond``) passed every check on 41 of 66 LFW faces instead of 37 (README).
        finish: give a near miss or a thin pass (`FINISH_FROM`, `FINISH_UNTIL`) an away cloak and
            check it again, before the fallback (step 4 of the module docstring).
        keep_mouth: keep the person's own lips and mouth (`SynthesisSettings.keep_mouth`), whatever
            ``settings`` says.

    Example:
        >>> bank = load_bank("mybank")  # doctest: +SKIP
        >>> result = FaceReplacer(bank)([image.pixels], detect_faces([image.pixels]))  # doctest: +SKIP
        >>> result.records[0]["protected"]  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        bank: DonorBank,
        models: Sequence[Embedder] | None = None,
        *,
        donors_per_face: int = DONORS_PER_FACE,
        seed: int = 0,
        attempts: int = REPLACE_ATTEMPTS,
        margin: float = 1.0,
        donor_margin: float | None = None,
        look_alike: float = 1.2,
        prefer_beyond: float = 1.3,
        min_face: int = REPLACE_MIN_FACE_PX,
        fallback: str = "blur",
        detector: FaceDetector | None = None,
        settings: SynthesisSettings | None = None,
        pool: int = 14,
        affinity: float = 3.0,
        finish: bool = True,
        keep_mouth: bool = False,
    ) -> None:
        if donors_per_face < 2:
            raise InvalidInputError(
                f"donors_per_face must be >= 2 (one donor would be reproduced), got {donors_per_face}"
            )
        if attempts < 1 or margin <= 0 or (donor_margin is not None and donor_margin <= 0) or min_face < 1:
            raise InvalidInputError("attempts and min_face must be >= 1 and the margins > 0")
        check_choice(fallback, REPLACE_FALLBACKS, "fallback")
        self.fallback = fallback
        self.bank = bank
        self.models = list(models) if models is not None else _available_models()
        bank.check_models(self.models, exact=False)
        bank.check_enough_donors(donors_per_face)
        self.donors_per_face = int(donors_per_face)
        self.seed = check_seed(seed)
        if self.seed is None:  # `check_seed` lets None through ("a fresh draw"): here a TypeError later
            raise InvalidInputError("seed must be an integer: a replacement is reproducible from its seed")
        self.attempts = int(attempts)
        self.margin = float(margin)
        self.donor_margins = {
            m.card.name: float(donor_margin)
            if donor_margin is not None
            else MEASURED_DONOR_MARGINS.get(m.card.name, DONOR_MARGIN)
            for m in self.models
        }
        self.look_alike = float(look_alike)
        self.prefer_beyond = float(prefer_beyond)
        self.min_face = int(min_face)
        self.settings = settings or SynthesisSettings()
        if keep_mouth:
            self.settings = replace(self.settings, keep_mouth=True)
        self.pool = max(int(pool), self.donors_per_face)
        self.affinity = float(affinity)
        self.finish = bool(finish)
        self._detector = detector
        self.thresholds = torch.tensor([m.card.match_threshold for m in self.models])
        self._smiles = mouth_width(bank.points)
        self._donor_eye_px = eye_distance(
            torch.tensor([donor["landmarks"] for donor in bank.donors], dtype=torch.float32)
        )
        self._detail_scales = torch.tensor([bank.detail_scale(row) for row in range(len(bank))])
        self._kin = _kin_of_donors(bank, self.models)
        self._registration: dict[tuple[int, bool], Tensor] = {}  # see `_registration_luminance`

    def __repr__(self) -> str:
        return (
            f"FaceReplacer(bank={self.bank.name!r}, donors={len(self.bank)}, "
            f"models={[m.card.name for m in self.models]}, donors_per_face={self.donors_per_face}, "
            f"seed={self.seed}, attempts={self.attempts}, margin={self.margin}, "
            f"donor_margins={self.donor_margins}, min_face={self.min_face})"
        )

    def keeping_mouth(self, keep_mouth: bool) -> FaceReplacer:
        """A copy of this replacer with ``keep_mouth`` set, sharing its bank, models, kin and caches.

        Relating every donor to its kin takes seconds per model on a large bank; a service that
        offers both variants computes it once.
        """
        other = copy.copy(self)
        other.settings = replace(self.settings, keep_mouth=bool(keep_mouth))
        return other

    @property
    def _device(self) -> torch.device:
        """Where the recognisers run (the CPU without any)."""
        return model_device(self.models[0]) if self.models else torch.device("cpu")

    @property
    def detector(self) -> FaceDetector:
        """The detector of the check (built on first use)."""
        if self._detector is None:
            self._detector = FaceDetector(device=self._device)
        return self._detector

    # -- the whole run ---------------------------------------------------------------------------

    def __call__(self, images: Tensor | Sequence[Tensor], faces: Faces) -> ReplaceResult:
        """Replace every face of ``faces`` in ``images`` ((B, 3, H, W) or a list of (3, H, W))."""
        given = check_image_list(images)
        check_face_values(check_faces(faces, len(given)), [photo.shape[-2:] for photo in given])
        # synthesis and the check run where the models are (a GPU's convolutions and resampling)
        photos = [photo.to(self._device) for photo in given]
        faces = faces.to("cpu")
        records: list[dict] = [dict(record) for record in faces.to_records()]
        sides = torch.minimum(faces.boxes[:, 2] - faces.boxes[:, 0], faces.boxes[:, 3] - faces.boxes[:, 1])
        small = (sides < self.min_face).nonzero()[:, 0].tolist()
        large = (sides >= self.min_face).nonzero()[:, 0].tolist()
        base = [photo.clone() for photo in photos]
        for n in small:
            i = int(faces.image_index[n])
            base[i] = blur_faces(base[i][None], faces.select([n]).shifted(-i))[0]
            records[n].update(
                method="blur",
                protected=True,
                reason=f"smaller than min_face ({float(sides[n]):.0f} px < {self.min_face} px): "
                "blurred instead",
            )
        uploads = _Uploads(photos)
        crops, checked = self._replace(photos, base, faces, large, records, uploads) if large else ({}, {})
        self._settle(base, crops, checked, faces, large, records, uploads)
        outputs = [
            image.to(photo.device) for image, photo in zip(_compose(base, crops, faces, photos), given)
        ]
        protected = torch.tensor([bool(record["protected"]) for record in records], dtype=torch.bool)
        return ReplaceResult(images=outputs, records=records, protected=protected)

    def _settle(
        self,
        base: list[Tensor],
        crops: dict[int, tuple],
        checked: dict[int, tuple],
        faces: Faces,
        rows: list[int],
        records: list[dict],
        uploads: _Uploads,
    ) -> None:
        """Apply the fallback to the faces that failed, and check again the faces beside them.

        A face checked while its neighbours still changed (their later tries, their fallback blur)
        is checked again in the final photo: a blur across the edge of its crop moves its embedding
        too. One that no longer passes falls back in turn, until nothing changes. ``base`` (the
        blurs), ``crops`` and ``records`` are updated in place.
        """
        failed = [n for n in rows if not records[n]["protected"]]
        crowded = _photos_with_several(faces, rows)
        face_keys = set(faces.select([0]).to_records()[0]) if len(faces) else set()
        while True:
            if self.fallback == "blur":
                for n in failed:
                    crops.pop(n, None)
                    # the rejected try's figures (its distances, donors, re-detection) described
                    # pixels the output does not hold, beside "protected": true: kept apart
                    best_try = {
                        key: records[n].pop(key)
                        for key in list(records[n])
                        if key not in face_keys and key not in ("method", "protected", "attempts", "reason")
                    }
                    records[n].update(
                        method="blur",
                        protected=True,
                        replaced=False,
                        reason=_fallback_reason(records[n]),
                        best_try=best_try,
                    )
                    i = int(faces.image_index[n])
                    base[i] = blur_faces(base[i][None], faces.select([n]).shifted(-i))[0]
            stale = [n for n in crops if records[n]["protected"] and int(faces.image_index[n]) in crowded]
            if not stale:
                break
            outputs = _compose(base, crops, faces, uploads.originals)
            again = self._verify(
                uploads,
                outputs,
                faces,
                stale,
                {n: checked[n][0] for n in stale},
                {n: checked[n][1] for n in stale},
            )
            failed = []
            for n, (check, _) in again.items():
                check.pop("_matched_donors", None)
                records[n].update(check)
                if not check["protected"]:
                    records[n]["reason"] = f"{check['reason']} once the faces beside it were final"
                    failed.append(n)
            crowded = {int(faces.image_index[n]) for n in failed} if self.fallback == "blur" else set()

    def _replace(
        self,
        photos: list[Tensor],
        base: list[Tensor],
        faces: Faces,
        rows: list[int],
        records: list[dict],
        uploads: _Uploads,
    ) -> tuple[dict[int, tuple], dict[int, tuple]]:
        """Synthesise and verify the faces at ``rows``.

        Returns each face's final crop, and what its check needs to run again (its original
        embeddings and the donor set of the crop kept).
        """
        chosen = faces.select(rows)
        targets = {m.card.name: embed_faces(photos, chosen, m).cpu() for m in self.models}
        chips = torch.cat(
            [
                canonical_chips(
                    photos[int(chosen.image_index[j])][None],
                    chosen.landmarks[j : j + 1],
                    torch.zeros(1, dtype=torch.long),
                )[0]
                for j in range(len(chosen))
            ]
        )
        poses, stats = estimate_pose(chosen.landmarks), face_statistics(chips).cpu()
        smiles, eyes = mouth_width(chosen.landmarks), eye_distance(chosen.landmarks.cpu())
        plans = {}
        draws = _places_in_photo(faces)
        for j, n in enumerate(rows):
            face = (poses[j], smiles[j], stats[j], {k: v[j] for k, v in targets.items()})
            eye_px = float(eyes[j])
            sets = self._donor_sets(*face, draws[n], eye_px=eye_px)
            plans[n] = _Plan(sets, face=face, eye_px=eye_px, draw=draws[n])
        crops: dict[int, tuple] = {}
        checked: dict[int, tuple] = {}
        for _ in range(self.attempts):
            pending = [n for n in rows if not plans[n].done and plans[n].sets]
            if not pending:
                break
            picks = {}
            for n in pending:
                plans[n].attempts += 1
                picks[n] = plans[n].sets.pop(0)
                plans[n].tried.add(tuple(sorted(picks[n][0])))
            tried = {}
            for n, crop in self._synthesise(photos, faces, picks, plans).items():
                crops[n] = crop
                tried[n] = picks[n]
            outputs = _compose(base, crops, faces, photos)
            checks = self._verify(
                uploads, outputs, faces, list(tried), {n: targets_row(targets, rows, n) for n in tried}, tried
            )
            for n, (check, score) in checks.items():
                plan = plans[n]
                record = dict(check, attempts=plan.attempts)
                if plan.best is None or score > plan.best[0]:
                    plan.best = (score, crops[n], record)
                if check["protected"]:
                    plan.done = True
                else:
                    plan.excluded |= set(check.pop("_matched_donors", []))
                    if _too_near(check):
                        # it stayed too near the person: plan again with donors that reach farther
                        shrink = self._shrink(check, picks[n][0], plan.face[3])
                        plan.shrink = shrink if plan.shrink is None else torch.minimum(plan.shrink, shrink)
                        plan.sets = self._donor_sets(
                            *plan.face, plan.draw, eye_px=plan.eye_px, shrink=plan.shrink
                        )
                    plan.sets = [
                        s
                        for s in plan.sets
                        if not set(s[0]) & plan.excluded and tuple(sorted(s[0])) not in plan.tried
                    ]
                if plan.best is not None:
                    crops[n] = plan.best[1]
        if self.finish:
            self._finish(base, crops, faces, plans, targets, rows, uploads)
        for n in rows:
            plan = plans[n]
            if plan.best is None:
                records[n].update(
                    method="replace",
                    protected=False,
                    redetected=False,
                    attempts=plan.attempts,
                    reason=(
                        f"no donor set could be used for this face: fewer than {self.donors_per_face} of "
                        "the bank's donors are far enough from this person (a look-alike is never used) "
                        "and whole in their photos; add donors"
                    ),
                )
                crops.pop(n, None)
                continue
            _, crop, record = plan.best
            crops[n] = crop
            checked[n] = (targets_row(targets, rows, n), (crop[3], crop[4]))
            record.pop("_matched_donors", None)
            upscale, limit = self._donor_upscale(chosen.landmarks[rows.index(n)], crop[3])
            records[n].update(
                record,
                attempts=plan.attempts,
                donor_upscale=upscale,
                detail_limit=limit,
                finished=bool(record.get("finished")),
            )
        return crops, checked

    def _finish(
        self,
        base: list[Tensor],
        crops: dict[int, tuple],
        faces: Faces,
        plans: dict[int, _Plan],
        targets: dict[str, Tensor],
        rows: list[int],
        uploads: _Uploads,
    ) -> None:
        """Cloak each near miss and thin pass away from its original face and donors; keep what passes.

        The faces of ``rows`` whose best try reached between FINISH_FROM and FINISH_UNTIL of every
        margin get one away cloak per level of `FINISH_LEVELS` (over every photo holding one), each
        followed by the check of `_verify`, until they pass. A face that passes with
        `FINISH_SPARE` to spare becomes its plan's best (``finished`` in its record); one that
        never does keeps its best try (passed or not: the fallback applies as before).
        """
        near = [
            n for n in rows if plans[n].best is not None and FINISH_FROM <= plans[n].best[0] < FINISH_UNTIL
        ]
        originals = {n: targets_row(targets, rows, n) for n in near}
        for level in FINISH_LEVELS:
            if not near:
                return
            finished = self._cloaked_tries(
                level, _compose(base, crops, faces, uploads.originals), faces, plans, originals, near
            )
            checks = self._verify(
                uploads,
                _compose(base, {**crops, **finished}, faces, uploads.originals),
                faces,
                near,
                {n: originals[n] for n in near},
                {n: finished[n][3:] for n in near},
            )
            passed = {
                n for n, (check, score) in checks.items() if check["protected"] and score >= FINISH_SPARE
            }
            for n in passed:
                check, score = checks[n]
                record = dict(check, attempts=plans[n].attempts, finished=True, finish_level=level)
                plans[n].best = (score, finished[n], record)
                plans[n].done = True
                crops[n] = finished[n]
            near = [n for n in near if n not in passed]

    def _cloaked_tries(
        self,
        level: str,
        photos: list[Tensor],
        faces: Faces,
        plans: dict[int, _Plan],
        originals: dict[int, dict[str, Tensor]],
        near: list[int],
    ) -> dict[int, tuple]:
        """The best try of each face of ``near`` (in ``photos``) after an away cloak at ``level``.

        ``originals``: each face's original embeddings per model (`targets_row`).
        """
        images, chosen = _in_their_photos(faces, near)
        away_from, margins = [], []
        for model in self.models:
            name = model.card.name
            table = self.bank.embeddings[name]
            leave = [torch.cat([originals[n][name][None], table[list(plans[n].best[1][3])]]) for n in near]
            away_from.append(torch.stack(leave))
            margin = [self.margin] + [self.donor_margins[name]] * self.donors_per_face
            margins.append(torch.tensor([margin] * len(near)))
        # the finish's caps bound a change to a new face, which shows no one: they keep the
        # region's measure its figures were tuned on; and its last step, as measured (the
        # cloak's average of its last steps came later and was not measured on replaced faces)
        cloak = AwayCloak(
            self.models,
            away_from,
            margins,
            level,
            steps=FINISH_STEPS,
            measured_on="region",
            average_iterates=False,
            seed=self.seed,
        )
        # `_verify` checks the photo kept, on every recogniser: the cloak's own check is not needed
        cloaked = cloak.perturb([photos[i] for i in images], chosen)
        finished = {}
        for n in near:
            (x0, y0, x1, y1), pixels, weight, donor_rows, mirrored = plans[n].best[1]
            region = cloaked[images.index(int(faces.image_index[n]))][:, y0:y1, x0:x1].to(pixels)
            finished[n] = (
                (x0, y0, x1, y1),
                torch.where(weight > 0, region, pixels),
                weight,
                donor_rows,
                mirrored,
            )
        return finished

    def _held_detail(self, face_eye_px: float) -> tuple[Tensor, Tensor]:
        """Each donor's finest detail for a face this large (N,), and whether its chip limits it (N,).

        The detail is an eye distance in pixels. The new face holds no finer detail than a donor's
        own photo, nor than the chip it is read from (eyes `CHIP_EYE_DISTANCE_PX` apart, times a
        donor's detail scale for a face large enough to read detail chips).
        """
        detailed = reads_detail_chips(face_eye_px)  # else read from the chips, whatever detail chips exist
        chips = CHIP_EYE_DISTANCE_PX * (
            self._detail_scales.float() if detailed else torch.ones(len(self.bank))
        )
        return torch.minimum(self._donor_eye_px, chips), chips < self._donor_eye_px

    def _donor_upscale(self, landmarks: Tensor, donor_rows: Sequence[int]) -> tuple[float, str]:
        """How many times larger this face is than the finest detail its new face can hold, and why.

        Eye distances, in pixels (`_held_detail`): limited by the smallest of its donors in their
        own photos (``"donors"``) or by the chips it is read from (``"chip"``). Above about 2 it
        looks softer than the photo around it (the largest face of `samples/group.jpg`: 1.74, donors).
        """
        face = float(eye_distance(landmarks[None].cpu())[0])
        held, by_chip = self._held_detail(face)
        rows = list(donor_rows)
        smallest = rows[int(held[rows].argmin())]
        limit = "chip" if bool(by_chip[smallest]) else "donors"
        return round(face / max(float(held[smallest]), 1e-6), 2), limit

    # -- donors ------------------------------------------------------------------------------------

    def _donor_sets(
        self,
        pose: Tensor,
        smile: Tensor,
        stats: Tensor,
        target: dict[str, Tensor],
        draw: int,
        *,
        eye_px: float = 0.0,
        shrink: Tensor | None = None,
    ) -> list:
        """Donor sets to try for one face, best first: ``[(rows, mirrored flags), ...]``.

        ``draw``: the face's place among its photo's faces (`_places_in_photo`), which seeds the
        little noise that varies the choice between faces.

        ``eye_px``: the face's eye distance in its photo; donors too small for it cost more
        (`RESOLUTION_COST`; 0: size not weighed).

        ``shrink``: after a try that stayed too near the person, how much nearer than its donors'
        mean a new face lands, per model (`_shrink`). The sets are then ranked first by how far
        from the person that predicts their new face to land; closeness to the person weighs
        less in the donors' cost, donors nearer than ``prefer_beyond`` / the smallest shrink
        count as near (`NEAR_DONOR_COST`), and the pool doubles.
        """
        bank = self.bank
        as_is, mirrored = (bank.pose[:, 0] - pose[0]).abs(), (-bank.pose[:, 0] - pose[0]).abs()
        mirror = (mirrored < as_is).tolist()
        yaw_gap = torch.minimum(as_is, mirrored)
        pose_cost = 3.0 * yaw_gap + 1.5 * (bank.pose[:, 1] - pose[1]).abs()
        pose_cost[yaw_gap > MAX_YAW_GAP] += TURNED_DONOR_COST
        colour = (bank.stats[:, :3] - stats[:3]).norm(dim=1) / 12.0
        beard = (bank.stats[:, 6] - stats[6]).abs() / 6.0 + (bank.stats[:, 8] - stats[8]).abs() / 8.0
        expression = (bank.stats[:, 7] - stats[7]).abs() / 8.0 + 3.0 * (self._smiles - smile).abs()
        glasses = GLASSES_COST * (glasses_likelihood(bank.stats[:, 9]) - glasses_likelihood(stats[9])).abs()
        enlarged = eye_px / self._held_detail(eye_px)[0].clamp_min(1e-6)
        resolution = RESOLUTION_COST * torch.log2(enlarged.clamp_min(1e-6) / RESOLUTION_FREE).clamp(min=0)
        ratios = torch.stack(
            [
                embedding_distance(bank.embeddings[m.card.name], target[m.card.name][None], m.card.distance)
                / m.card.match_threshold
                for m in self.models
            ],
            dim=1,
        )  # (donors, models): distance to the person in thresholds
        reach = 1.0 if shrink is None else float(1.0 / shrink.min().clamp_min(1 / 3))
        kin_of_face = torch.zeros(len(ratios), dtype=torch.bool)
        kin_of_face[ratios.mean(1).argsort()[: self._kin.shape[1]]] = True
        shared = kin_of_face[self._kin].float().mean(1)  # (donors,) the share of kin in common
        kin = KIN_COST / reach * (1 - shared / KIN_ENOUGH).clamp(min=0)  # less, once a try fell short
        cost = (
            pose_cost
            + colour
            + beard
            + glasses
            + expression
            + resolution
            + kin
            + self.affinity / reach * ratios.mean(1)
        )
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        cost = cost + 0.15 * torch.rand(len(cost), generator=generator)  # variety between faces
        nearest = ratios.min(1).values
        cost[nearest < self.prefer_beyond * reach] += NEAR_DONOR_COST
        cost[nearest < self.look_alike] = math.inf
        cost[~bank.usable] = math.inf  # cut off by its photo's edge: black or someone else in its chip
        order = cost.argsort()
        pool_size = self.pool if shrink is None else 2 * self.pool
        while (
            pool_size > self.donors_per_face and math.comb(pool_size, self.donors_per_face) > MAX_DONOR_SETS
        ):
            pool_size -= 1
        pool = [int(r) for r in order[:pool_size] if math.isfinite(float(cost[r]))]
        if len(pool) < self.donors_per_face:
            return []
        combos = torch.tensor(list(itertools.combinations(pool, self.donors_per_face)), dtype=torch.long)
        to_donors, to_target = self._predicted_margins(combos, target)
        landing = to_target.amin(1) if shrink is None else (to_target * shrink).amin(1)
        scores = 2.0 * torch.minimum(to_donors, landing).clamp(max=1.0) - cost[combos].mean(1)
        if shrink is not None:  # first: sets predicted to land past every threshold (5% to spare)
            scores = scores + REPLAN_WEIGHT * (landing / REPLAN_LANDING).clamp(max=1.0)
        usable = torch.isfinite(scores)
        order = scores[usable].argsort(descending=True)[: _SETS_PER_ATTEMPT * self.attempts]
        scored = [(None, tuple(rows)) for rows in combos[usable][order].tolist()]
        mouth_cost = expression.tolist()
        eye_cost = pose_cost.tolist()
        sets = []
        for _, rows in scored:
            # parts (`facecloak.synthesis.part_weights`): eyes, nose, mouth; the mouth from the donor
            # whose expression is closest, the eyes from the one whose pose is closest
            mouth = min(rows, key=lambda r: mouth_cost[r])
            rest = sorted((r for r in rows if r != mouth), key=lambda r: eye_cost[r])
            ordered = (rest[0], rest[1], mouth, *rest[2:]) if len(rest) >= 2 else (rest[0], mouth)
            sets.append((ordered, tuple(mirror[r] for r in ordered)))
        return sets

    def _predicted_margins(self, combos: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Distances, in thresholds, from each set's mean embedding to its nearest donor and the person.

        Returns (C,) to the nearest donor, -inf where two donors of a set are the same identity
        (their mix would be that person), and (C, models) to the person. Every distance comes
        from the dot products among the sets' donors and with the person (`_mean_distances`),
        so thousands of sets cost no more than their donors.
        """
        worst = torch.full((len(combos),), math.inf)
        person = []
        members, local = combos.unique(return_inverse=True)
        for model in self.models:
            name, threshold = model.card.name, model.card.match_threshold
            to_donors, to_target, closest_pair = _mean_distances(
                self.bank.embeddings[name][members].double(),
                target[name].double(),
                local,
                model.card.distance,
            )
            worst = torch.minimum(worst, to_donors.float() / threshold)
            person.append(to_target.float() / threshold)
            worst[closest_pair < threshold] = -math.inf
        return worst, torch.stack(person, 1)

    def _shrink(self, check: dict, rows: Sequence[int], target: dict[str, Tensor]) -> Tensor:
        """(models,) how much nearer the person a try's new face landed than its donors' mean, per model.

        The new face keeps the person's hair, outline, glasses and lighting, so it lies nearer the
        person than the mean of its donors' embeddings: the measured distance over the one
        `_predicted_margins` predicted (at most 1), which `_donor_sets` applies to the sets left.
        """
        predicted = self._predicted_margins(torch.tensor([sorted(rows)]), target)[1][0]
        reached = torch.tensor(
            [check["distance_to_original"][m.card.name] / m.card.match_threshold for m in self.models]
        )
        return (reached / predicted.clamp_min(1e-6)).clamp(max=1.0)

    # -- synthesis and the check -------------------------------------------------------------------

    def _synthesise(self, photos: list[Tensor], faces: Faces, picks: dict, plans: dict) -> dict[int, tuple]:
        """One new face per face ``n`` of ``picks`` (``n -> (donor rows, mirrored flags)``).

        The donors of every face are registered together (`facecloak.synthesis.donor_warps` over
        groups): the same warps as one face at a time, for a fraction of the calls.
        """
        sets = {}
        for n, (rows, mirrored) in picks.items():
            chips = self.bank.chips(rows)
            points = self.bank.points[list(rows)].clone()
            flips = torch.tensor(mirrored)
            if bool(flips.any()):
                chips[flips], points[flips] = mirror_chips(chips[flips], points[flips])
            luminance = torch.stack(
                [self._registration_luminance(r, m, chip) for r, m, chip in zip(rows, mirrored, chips)]
            )
            device = photos[int(faces.image_index[n])].device
            sets[n] = (chips.to(device), points.to(device), luminance.to(device))
        order = list(sets)
        warps = {}
        for start in range(0, len(order), _WARP_GROUPS):
            part = order[start : start + _WARP_GROUPS]
            chips, points, luminance = (torch.stack([sets[n][i] for n in part]) for i in range(3))
            found = donor_warps(points.mean(1), points, chips, self.settings.register, luminance=luminance)
            warps.update(zip(part, found))
        crops = {}
        for n in order:
            rows, mirrored = picks[n]
            chips, points, _ = sets[n]
            photo = photos[int(faces.image_index[n])]
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + plans[n].draw) * 31 + plans[n].attempts
            )
            result = synthesize_face(
                photo,
                faces.landmarks[n],
                chips,
                points,
                settings=self.settings,
                generator=generator,
                warps=warps[n],
                detail_chips=self._detail_chips(faces.landmarks[n], rows, mirrored),
            )
            if result is not None:
                crops[n] = (result.box, result.pixels, result.weight, rows, mirrored)
        return crops

    def _detail_chips(
        self, landmarks: Tensor, rows: Sequence[int], mirrored: Sequence[bool]
    ) -> Tensor | None:
        """The donors' detail chips (mirrored as used) for a face larger than a chip, if any has one."""
        large = reads_detail_chips(float(eye_distance(landmarks[None].cpu())[0]))
        if not large or all(self.bank.detail_scale(row) == 1 for row in rows):
            return None
        detail = self.bank.detail_chips(rows)
        flips = torch.tensor(mirrored)
        if bool(flips.any()):
            detail[flips] = detail[flips].flip(-1)
        return detail

    def _registration_luminance(self, row: int, mirrored: bool, chip: Tensor) -> Tensor:
        """A donor's `registration_luminance` (as used, mirrored or not): computed once per run."""
        key = (row, mirrored)
        if key not in self._registration:
            self._registration[key] = registration_luminance(chip[None])[0]
        return self._registration[key]

    def _verify(
        self,
        uploads: _Uploads,
        outputs: list[Tensor],
        faces: Faces,
        rows: list[int],
        targets: dict,
        tried: dict,
    ) -> dict:
        """Check faces ``rows`` after a JPEG-75 re-encode and a fresh detection."""
        if not rows:
            return {}
        images, checked = _in_their_photos(faces, rows)  # numbered as the photos given to the detector
        batch = [uploads(i, outputs[i]) for i in images]
        with torch.no_grad():
            found = redetect(self.detector, batch, checked)
        # matched one to one among every face of these photos, not only those checked now: a face
        # checked alone (its neighbour done at an earlier try) took its overlapping neighbour's
        # detection when its own new face was not found, and passed as "found again" through it
        beside = [m for m in range(len(faces)) if m not in rows and int(faces.image_index[m]) in images]
        matched, _ = match_redetected(_in_their_photos(faces, list(rows) + beside)[1], found)
        matched = matched[: len(rows)]
        results = {}
        matches, matched_rows = [], []
        for n, best in zip(rows, matched.tolist()):
            if best < 0:
                results[n] = (
                    self._record(
                        tried[n],
                        redetected=False,
                        reason=f"the new face was not detected again after JPEG {VERIFY_JPEG_QUALITY}",
                    ),
                    -1.0,
                )
            else:
                matches.append(best)
                matched_rows.append(n)
        if matched_rows:
            again = found.select(matches)
            embeddings = {m.card.name: embed_faces(batch, again, m).cpu() for m in self.models}
            for j, n in enumerate(matched_rows):
                results[n] = self._judge(
                    n, tried[n], targets[n], {k: v[j] for k, v in embeddings.items()}, float(again.scores[j])
                )
        return results

    def _judge(self, n: int, tried, target: dict[str, Tensor], embedding: dict[str, Tensor], score: float):
        rows, mirrored = tried
        to_original, to_donors, matched = {}, {}, set()
        worst, person_matched = math.inf, False
        for model in self.models:
            name, metric = model.card.name, model.card.distance
            needed = model.card.match_threshold * self.margin
            needed_from_donor = model.card.match_threshold * self.donor_margins[name]
            original = float(embedding_distance(embedding[name], target[name], metric))
            donors = embedding_distance(self.bank.embeddings[name][list(rows)], embedding[name][None], metric)
            to_original[name], to_donors[name] = round(original, 4), round(float(donors.min()), 4)
            matched |= {rows[k] for k in (donors < needed_from_donor).nonzero()[:, 0].tolist()}
            person_matched |= original < needed
            worst = min(worst, original / needed, float(donors.min()) / needed_from_donor)
        protected = worst >= 1.0
        reason = None
        if not protected:  # the person first: a donor's match hid that the face was still theirs
            still = ["the original face"] * person_matched + ["a donor used"] * bool(matched)
            reason = "still matches " + " and ".join(still)
        record = self._record(tried, redetected=True, reason=reason, protected=protected)
        record.update(
            distance_to_original=to_original,
            distance_to_donors=to_donors,
            score_after=round(score, 4),
            _matched_donors=sorted(matched),
        )
        return record, worst

    def _record(self, tried, *, redetected: bool, reason: str | None, protected: bool = False) -> dict:
        rows, mirrored = tried
        record = {
            "method": "replace",
            "protected": bool(protected and redetected),
            "redetected": redetected,
            "donors": [self.bank.donors[r]["id"] for r in rows],
            "mirrored": list(mirrored),
            "thresholds": {m.card.name: round(m.card.match_threshold * self.margin, 6) for m in self.models},
            "donor_thresholds": {
                m.card.name: round(m.card.match_threshold * self.donor_margins[m.card.name], 6)
                for m in self.models
            },
        }
        if reason:
            record["reason"] = reason
        return record


class _Uploads:
    """Each photo of one call as an upload site stores it (JPEG `VERIFY_JPEG_QUALITY`), per try.

    A try changes a few faces of a photo: `facecloak.io.jpeg_roundtrip_changed` re-encodes only
    the coded units around them, from the original photo's round trip, computed once. Exactly the
    same pixels as re-encoding the whole photo, for a fraction of the time on a large one.
    """

    def __init__(self, originals: list[Tensor]) -> None:
        self.originals = originals
        self._round_trips: dict[int, Tensor] = {}

    def __call__(self, i: int, photo: Tensor) -> Tensor:
        """Photo ``i`` (a changed copy of original ``i``) after the upload's re-encode."""
        if i not in self._round_trips:
            self._round_trips[i] = io.jpeg_roundtrip(self.originals[i], VERIFY_JPEG_QUALITY)
        return io.jpeg_roundtrip_changed(photo, self.originals[i], self._round_trips[i], VERIFY_JPEG_QUALITY)


def _kin_of_donors(bank: DonorBank, models: Sequence[Embedder]) -> Tensor:
    """(donors, k) each donor's `KIN_SHARE` nearest other donors, by mean distance in thresholds."""
    count = len(bank)
    k = min(count - 1, KIN_MAX, max(KIN_MIN, round(count * KIN_SHARE)))
    kin = torch.empty(count, max(k, 0), dtype=torch.long)
    cards = [(m.card.name, m.card.distance, m.card.match_threshold) for m in models]
    for start in range(0, count, 1024):  # (1024, donors) at a time: 1 s for 10,000 donors, per model
        rows = slice(start, min(count, start + 1024))
        distance = sum(
            distance_matrix(bank.embeddings[name][rows], bank.embeddings[name], metric) / threshold
            for name, metric, threshold in cards
        ) / len(cards)
        distance[torch.arange(rows.stop - rows.start), torch.arange(rows.start, rows.stop)] = math.inf
        kin[rows] = distance.topk(k, dim=1, largest=False).indices
    return kin


def _mean_distances(
    donors: Tensor, person: Tensor, sets: Tensor, metric: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Distances of each set's mean embedding, from Gram matrices instead of the vectors.

    Args:
        donors: (P, D) embeddings of the donors the sets are drawn from.
        person: (D,) the person's embedding.
        sets: (C, K) rows of ``donors`` in each set.
        metric: ``"euclidean"`` or ``"cosine"`` (scale-free: the mean need not be normalised).

    Returns:
        (C,) from each set's mean to its nearest donor, (C,) from it to the person, and (C,) the
        distance between the set's two closest donors.
    """
    gram = donors @ donors.T  # (P, P)
    with_person = donors @ person  # (P,)
    k = sets.shape[1]
    among = gram[sets[:, :, None], sets[:, None, :]]  # (C, K, K)
    donor_dot_mean = among.sum(2) / k  # (C, K): each donor . the set's mean
    mean_dot_mean = donor_dot_mean.sum(1) / k  # (C,)
    person_dot_mean = with_person[sets].sum(1) / k
    own = among.diagonal(dim1=1, dim2=2)  # (C, K): each donor . itself
    if metric == "euclidean":
        to_donors = (own - 2 * donor_dot_mean + mean_dot_mean[:, None]).clamp_min(1e-12).sqrt()
        to_person = (person @ person - 2 * person_dot_mean + mean_dot_mean).clamp_min(1e-12).sqrt()
        pairs = (own[:, :, None] + own[:, None, :] - 2 * among).clamp_min(1e-12).sqrt()
    else:
        norms, mean_norm = own.clamp_min(1e-24).sqrt(), mean_dot_mean.clamp_min(1e-24).sqrt()
        to_donors = 1 - donor_dot_mean / (norms * mean_norm[:, None])
        to_person = 1 - person_dot_mean / (person.norm().clamp_min(1e-12) * mean_norm)
        pairs = 1 - among / (norms[:, :, None] * norms[:, None, :])
    pairs = pairs + torch.eye(k, dtype=pairs.dtype) * 1e9  # a donor and itself are not a pair
    return to_donors.amin(1), to_person, pairs.flatten(1).amin(1)


def targets_row(targets: dict[str, Tensor], rows: list[int], n: int) -> dict[str, Tensor]:
    """The original face's embeddings (per model) of face ``n`` (``targets`` is in ``rows`` order)."""
    j = rows.index(n)
    return {name: table[j] for name, table in targets.items()}


def _too_near(check: dict) -> bool:
    """Whether a checked try's new face stayed within some model's margin of the original face."""
    thresholds = check.get("thresholds", {})
    return any(d < thresholds[name] for name, d in check.get("distance_to_original", {}).items())


def _in_their_photos(faces: Faces, rows: list[int]) -> tuple[list[int], Faces]:
    """The photos holding faces ``rows`` (sorted), and those faces numbered as in that list."""
    images = sorted({int(faces.image_index[n]) for n in rows})
    local = {i: k for k, i in enumerate(images)}
    chosen = faces.select(rows)
    index = torch.tensor([local[int(i)] for i in chosen.image_index], dtype=torch.long)
    return images, Faces(chosen.boxes, chosen.landmarks, chosen.scores, index)


def _places_in_photo(faces: Faces) -> list[int]:
    """Each face's place among the faces of its own photo (0, 1, ...).

    A face's donor draw and grain are seeded by it, not by the face's place in the call: a photo
    replaced in a batch got other faces than the same photo alone, or than after a resumed or
    differently chunked run, with the same seed. (The finish's faint cloak is not: it runs the
    call's faces together, and a finished face can differ by a few levels beside other photos.)
    """
    seen: dict[int, int] = {}
    places = []
    for i in faces.image_index.tolist():
        places.append(seen.get(i, 0))
        seen[i] = places[-1] + 1
    return places


def _photos_with_several(faces: Faces, rows: list[int]) -> set[int]:
    """The photos holding two or more of the faces ``rows``."""
    photos = faces.image_index[rows].tolist()
    return {i for i in photos if photos.count(i) > 1}


def _compose(
    base: list[Tensor], crops: dict[int, tuple], faces: Faces, originals: list[Tensor]
) -> list[Tensor]:
    """The photos with every face's current crop blended in (in face order).

    A crop's feathered edge is a blend with the original photo, so wherever ``base`` already
    differs from ``originals`` (a face blurred there: too small, or fallen back) ``base`` is kept:
    pasted over it, the edge of a neighbour's new face put the blurred face's own cheek back.
    """
    outputs = [photo.clone() for photo in base]
    for n in sorted(crops):
        (x0, y0, x1, y1), pixels, weight = crops[n][:3]
        i = int(faces.image_index[n])
        region = outputs[i][:, y0:y1, x0:x1]
        blurred = (base[i][:, y0:y1, x0:x1] != originals[i][:, y0:y1, x0:x1]).any(0)
        outputs[i][:, y0:y1, x0:x1] = torch.where((weight > 0) & ~blurred, pixels.to(region), region)
    return outputs


def _available_models() -> list[Embedder]:
    """Every recogniser available here (what a bank is checked against by default)."""
    from facecloak.models import available_embedders, create_embedder

    return [create_embedder(name) for name in available_embedders()]


_replacers: dict[tuple, FaceReplacer] = {}
_banks: dict[str, tuple[tuple[int, int], DonorBank]] = {}


def _named_bank(name: str | Path) -> DonorBank:
    """The bank called ``name``, loaded again only when its manifest changed.

    `replace_faces` keeps one replacer per bank object: a bank loaded afresh on every call (a
    name given to it, or to ``Anonymizer("replace", bank=NAME)`` once per batch) built and kept
    a new replacer, with new models, each time (25 MB more per call with dlib-resnet alone).
    """
    manifest = bank_folder(name) / "bank.json"
    try:
        stat = manifest.stat()
    except OSError:
        return load_bank(name)  # raises the error that says what to run
    key, stamp = str(manifest.resolve()), (stat.st_mtime_ns, stat.st_size)
    held = _banks.get(key)
    if held is None or held[0] != stamp:
        if held is not None:  # the bank changed on disk: its replacers go with its old version
            for stale in [k for k, replacer in _replacers.items() if replacer.bank is held[1]]:
                del _replacers[stale]
        _banks[key] = (stamp, load_bank(name))
    return _banks[key][1]


def replace_faces(
    images: Tensor | Sequence[Tensor],
    faces: Faces,
    bank: DonorBank | str,
    *,
    donors_per_face: int = DONORS_PER_FACE,
    seed: int = 0,
    min_face: int = REPLACE_MIN_FACE_PX,
    models: Sequence[Embedder] | None = None,
    **options: Any,
) -> ReplaceResult:
    """Replace every face with a verified mix of donors (see the module docstring).

    Args:
        images: (B, 3, H, W) in [0, 1], or a list of (3, H_i, W_i).
        faces: the faces to replace (e.g. from `facecloak.detect.detect_faces`).
        bank: a loaded `DonorBank`, or a bank's name or folder.
        donors_per_face: donors mixed into each new face.
        seed: the same seed gives the same faces (for the same photos: `FaceReplacer`'s ``seed``).
        min_face: smaller faces are blurred instead (and reported).
        models: recognisers of the check (default: every one available here).
        **options: further `FaceReplacer` keywords (``attempts``, ``margin``, ``donor_margin``,
            ``fallback``, ...).

    Returns:
        `ReplaceResult`: the new photos, one record per face, and which faces are protected.

    Example:
        >>> result = replace_faces([image.pixels], detect_faces([image.pixels]), "mybank")  # doctest: +SKIP
        >>> result.protected  # doctest: +SKIP
        tensor([True])
    """
    bank = _named_bank(bank) if not isinstance(bank, DonorBank) else bank
    key = (
        str(bank.folder),
        id(bank),
        donors_per_face,
        seed,
        min_face,
        tuple(id(m) for m in models or ()),
        tuple(sorted(options.items())),
    )
    if key not in _replacers:
        _replacers[key] = FaceReplacer(
            bank, models, donors_per_face=donors_per_face, seed=seed, min_face=min_face, **options
        )
    return _replacers[key](images, faces)


def _fallback_reason(record: dict) -> str:
    """Why a face was blurred instead: its tries, or that no donor set could even be tried."""
    why = record.get("reason", "failed")
    if not record.get("attempts"):  # "no donor mix passed every check in 0 tries" read as a bug
        return f"{why}: blurred instead"
    return f"no donor mix passed every check in {record['attempts']} tries ({why}): blurred instead"
