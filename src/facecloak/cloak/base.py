"""The cloak contract: budgets, the optimisation loop, the per-face result.

A cloak is a small perturbation of each face, optimised at the photo's native resolution (a face
far larger than the models' chips: at its working scale, `facecloak.cloak.scale`), inside a
feathered face region, through the differentiable alignment into every chosen face model at
once, and through random simulated uploads (JPEG, rescaling, blur, landmark noise). Subclasses
(one file per method) only say what to minimise per face (`Cloak.objective`); the loop, the
budget (L-infinity and DSSIM caps, both enforced, not just penalised), early stopping and the
honest check after a real JPEG re-encode and re-detection live here.

Budgets follow Fawkes' perceptual levels (DSSIM caps 0.004 / 0.012 / 0.017 for low / mid / high;
Shan et al., USENIX Security 2020), measured on the face region at native resolution.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from facecloak import quality, transforms
from facecloak._checks import (
    check_choice,
    check_faces,
    check_image_list,
    check_range,
    check_seed,
    is_finite_number,
    is_whole_number,
)
from facecloak._device import cpu_has_native_bfloat16
from facecloak.align import affine_scale, model_alignment
from facecloak.cloak.budget import (
    DSSIM_SAFETY,
    LEVELS,
    CloakBudget,
    enforce_dssim,
    jnd_map,
    largest_factor_under_cap,
    limit_change,
    scale_colour,
)
from facecloak.cloak.dropout import feature_dropout
from facecloak.cloak.eot import ROBUSTNESS, UploadSimulator
from facecloak.cloak.features import FeatureTap, feature_displacement
from facecloak.cloak.regions import (
    GPU_BUCKET_FACES,
    MAX_BUCKET_FACES,
    Bucket,
    build_buckets,
    paste_perturbations,
    sample_chips,
)
from facecloak.cloak.scale import working_factors, working_photos
from facecloak.cloak.skip_gradient import skip_gradient
from facecloak.cloak.verify import face_records, measure_cloaked
from facecloak.defaults import MIN_SCALE, REGION_SCALE
from facecloak.detect import FaceDetector
from facecloak.embed import embed_faces, model_device
from facecloak.errors import InvalidInputError
from facecloak.faces import Faces, boxes_overlap, check_face_values, face_regions, pixel_bounds
from facecloak.models.registry import Embedder

UPDATES = ("adam", "momentum")
MEASURED_ON = ("face", "region")
"""Where a cloak's DSSIM and CIEDE2000 caps hold and its report measures them: "face", on the
face's detection box, with the wider region around it (hair, hat, neck) held to `REGION_SHARE` of
the caps; "region", on the region alone (facecloak before 2026-12-06). Over the region the same
change measures about 40% less than over the face, where it concentrates and a viewer looks."""
REGION_SHARE = 0.65
"""The share of the caps the whole region may use when they hold on the face box: the face box
is about 0.6 of the region's area, so the ring around it keeps about a seventh of a cap. Held to
the whole cap, the ring took the change the face box could no longer hold: a rippled band on a
dark hat brim and a dark line along the chin, at 2x on the samples."""
PRECISIONS = ("float32", "bfloat16")
CUDA_PRECISION = "float32"
"""The optimisation's model passes on a GPU stay float32 (cuDNN's convolutions run as TF32 there):
on an H200 bfloat16 moved neither faces/s (18.3 vs 20.1 for dlib-resnet, whole pipeline, 512-photo
chunks) nor protection (0.938 vs 0.945) (docs/speed.md; `scripts/bench_cloak.py --device cuda
--precisions float32,bfloat16`): the step is bound by its many small operations, not by arithmetic."""


def cpu_precision() -> str:
    """The optimisation's model passes on the CPU: bfloat16 where the CPU multiplies it in hardware.

    With AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later) one forward and backward pass of the
    dlib ResNet at 1 / 4 faces took 14 / 28 ms against 18 / 47 in float32; on 48 LFW photos at
    `mid` the cloak took 0.58 s a face against 0.80 (1.14 against 1.43 with two models), moving faces
    as far on every model, attacked or not (docs/speed.md, "bfloat16 on the CPU"). Elsewhere torch
    emulates bfloat16, slower than float32, which stays.
    """
    return "bfloat16" if cpu_has_native_bfloat16() else "float32"


DEFAULT_DIVERSITY = 0.7
DEFAULT_SMOOTHING = 1.0
DEFAULT_SPEND_BUDGET = True
"""Transfer defaults, chosen on the leave-one-out ablation (docs/transfer.md;
`scripts/ablate_transfer.py`): input diversity and gradient smoothing, and spending
every step rather than stopping at the aim, each moved faces further on the model left out, at
the same visibility (small gains: the DSSIM cap is what limits a `mid` cloak)."""
DEFAULT_DROPOUT = 0.0
"""Feature dropout is off: on the same ablation it moved faces less on the left-out model."""
DEFAULT_SKIP_GRADIENT = 1.0
"""Residual branches pass back their whole gradient (the skip gradient method is off)."""
SUBSET_FROM_MODELS = 3
"""From this many models on, each step attacks all of them but one, each model left out once in
every round of as many steps, in random order (`default_models_per_step`,
`Cloak._model_schedule`): two thirds of the models' time with three. Measured on 24 LFW faces
cloaked with our three models, displacement after JPEG 75: 1.25 / 1.02 / 1.31 thresholds
(dlib-resnet / MobileFace / HSE; 1.22 / 0.99 / 1.29 with each step's subset drawn independently)
against 1.25 / 1.01 / 1.37 with every model every step; the DSSIM cap, more than the number of
gradients a step averages, limits a step (README, "How the cloak works";
`scripts/probe_transfer.py --options '{"models_per_step": 3}'`)."""
DEFAULT_AVERAGE_ITERATES = True
AVERAGE_DECAY = 0.9
AVERAGE_FROM = 0.6
AVERAGE_MIN_STEPS = 40
"""With ``average_iterates`` (and ``spend_budget``, and a budget of at least AVERAGE_MIN_STEPS
steps), the change a cloak returns is not its last step's but a running average of its steps from
AVERAGE_FROM of the budget's steps on (each step's weight AVERAGE_DECAY times the next one's:
about the last ten), which the final enlargement then brings back to the DSSIM cap (`_fill`).
Near the cap Adam's steps swing about a direction that serves the attacked models; what the
average keeps is the part every step agreed on (Polyak's averaging, as stochastic weight averaging
uses it for weights). On 16 LFW photos (JPEG 75, `mid`, same face DSSIM 0.0077), dlib-resnet +
MobileFace moved the unseen HSE MobileNet 0.674 thresholds instead of 0.656 (another 16: 0.630
against 0.610) and both attacked models 0.01-0.04 further; dlib-resnet + HSE moved the unseen
MobileFace 0.605 instead of 0.587 (docs/transfer.md, with the leave-one-out figures). A
shorter run is still growing its change when the average starts, and the average lags it: 8 LFW
faces, 20 steps under the region's looser cap, moved MobileFace 0.92 thresholds averaged against
0.99 from the last step, hence AVERAGE_MIN_STEPS (every level has 40 or more)."""
DEFAULT_FEATURE_WEIGHT = 0.0
DEFAULT_FEATURE_DEPTH = 0.5
"""The intermediate-feature loss is off; when on, it takes the convolution halfway through."""

ADAM_BETAS = (0.9, 0.999)
"""Adam's decay rates of the gradient's first and second moments (Kingma & Ba's defaults)."""
ADAM_EPSILON = 1e-12
"""Added to Adam's root second moment; tiny, because gradients w.r.t. pixels are tiny."""
MOMENTUM_DECAY = 1.0
"""MI-FGSM's decay of the accumulated, L1-normalised gradient (Dong et al., CVPR 2018)."""

EXTRA_STEPS_BELOW = 1.15
RECENT_DECAY = 0.8
"""With the budget spent (``spend_budget``), a face whose distance on some model, through the
simulated upload, is still under EXTRA_STEPS_BELOW thresholds takes up to the budget's
``extra_steps`` more steps; the others stop. The time goes to the faces that would otherwise fall
short. The distance is a running mean over the steps (each step's weight RECENT_DECAY times the
next one's: about the last five): one random upload's swings by a fifth from step to step."""

STEADY_STEPS = 2
"""A face stops once every model is past its stopping distance this many steps running."""

SPEND_TARGET = 3.0
"""With ``spend_budget`` on, each model pulls, and the face keeps going, until its distance is this
multiple of its threshold (in practice: until the steps run out)."""

OBJECTIVE_MARGIN = 0.25
"""The objective aims this far (in thresholds) past ``aim``, so the aim is reached, not approached."""

COMPOSE_ROUNDS = 8
COMPOSE_SHRINK = 0.8
COMPOSE_MAX_SHRINK = 0.98
"""Pasting faces back: up to COMPOSE_ROUNDS rounds that scale the changes near an over-budget face
by the square root of cap / DSSIM, kept within [COMPOSE_SHRINK, COMPOSE_MAX_SHRINK]."""

LAST_RESORT_ROUNDS = 8
"""Rounds after COMPOSE_ROUNDS for a face still over its cap, each shrinking its change by the
square root of cap / DSSIM and at least COMPOSE_SHRINK; one still over after them loses its change
(and so reads NOT protected): the level's visibility is what the user chose. Never reached with a
PNG or a JPEG at the input's own tables; a JPEG re-encoded whole at quality 10 ended the
astronaut's face at DSSIM 0.0085 over `mid`'s 0.008 (CIEDE2000 mean 4.8), reported as within it."""

_LAST_COMPOSE_ROUND = COMPOSE_ROUNDS + LAST_RESORT_ROUNDS
"""The compose round whose faces still over their cap lose their change (`_shrink` gives 0); the
round after it only measures."""


def _shrink(excess: float, round_: int) -> float:
    """The factor on a change whose face is ``excess`` times its cap, in compose round ``round_``.

    0 once the rounds are spent (`LAST_RESORT_ROUNDS`).
    """
    if round_ >= _LAST_COMPOSE_ROUND:
        return 0.0
    if round_ >= COMPOSE_ROUNDS:
        return min(COMPOSE_SHRINK, excess**-0.5)
    # DSSIM grows about as the square of a small change: shrink by the square root of the excess
    # (a face 2% over loses 1% of its change, not a fifth), within limits
    return min(COMPOSE_MAX_SHRINK, max(COMPOSE_SHRINK, excess**-0.5))


DSSIM_PENALTY = 3.0
DSSIM_PENALTY_FROM = 0.9
"""The loss adds DSSIM_PENALTY x (DSSIM / cap - DSSIM_PENALTY_FROM) once a face's DSSIM passes that
share of its cap, steering the change toward textured areas before the hard cap has to act."""

DSSIM_CHECK_EVERY = 4
"""Steps between hard DSSIM checks (the penalty in the loss keeps faces under the cap meanwhile)."""

COLOUR_CHUNK = 32
"""How many faces' CIEDE2000 maps `Cloak._limit_colour` computes at once."""

FILL_BUDGET = True
FILL_MAX_FACTOR = 2.0
"""With the budget spent (``spend_budget``), the change of each face is finally enlarged, by at
most FILL_MAX_FACTOR (its direction was chosen for a change of about its own size), until the
stored face reaches the DSSIM cap (`Cloak._fill`, `facecloak.cloak.budget.largest_factor_under_cap`)."""

PIXEL_LEVELS = 255.0
"""8-bit grey levels per unit of intensity: budgets and step sizes are given in 1/255."""

FLIP_PROBABILITY = 0.5
"""Share of chips mirrored in each draw when ``robust_to`` includes "flip"."""

GRADIENT_NORM_FLOOR = 1e-20
"""Smallest mean absolute gradient momentum divides by (a face with no gradient stays put)."""

StepCallback = Callable[[int, int, Tensor, Tensor], None]
"""Called after each optimisation step with (step, most steps, (N,) bool faces done, (N,) each
face's latest distance as a multiple of its match threshold, worst model)."""

PersonReferences = tuple[list[Tensor], Tensor]
"""Per model, (N, D_m) what each of N faces is pushed from, and (N,) how many clean photos each
averages (`Cloak.references`)."""


@dataclass(frozen=True)
class CloakResult:
    """What a cloak did to each face.

    Attributes:
        images: the cloaked photos, (3, H_i, W_i) each, in [0, 1]: what every measure and the
            check read. With a lossy ``stored_as``, each as its file will decode (`to_write`).
        model_names: the models attacked, in column order of the distance tensors.
        thresholds: (M,) each model's match threshold.
        distance: (N, M) distance of each cloaked face to its reference (our alignment): its own clean
            embedding, or, for a person-level cloak, the mean clean embedding of its person's photos
            in the call (``reference_photos`` says how many).
        distance_jpeg: (N, M) the same after a real JPEG re-encode at `VERIFY_JPEG_QUALITY` and
            detection from scratch; NaN where the face was not found again.
        found_after_jpeg: (N,) the face was detected again after the re-encode.
        dssim, psnr, linf: (N,) image change over the face region (linf in 1/255 units).
        ciede_mean, ciede_p99: (N,) CIEDE2000 colour difference over the face region: mean and
            99th percentile (about 1 is just noticeable side by side).
        steps: (N,) optimisation steps taken.
        protected: (N,) every model's ``distance_jpeg`` reached its match threshold (a face not
            found again counts as protected: a scraper cannot enrol it).
        seconds: wall time of the whole call.
        reference_photos: (N,) how many clean photos each face's reference averages (1: its own).
        timings: seconds per stage of the call ("embed", "prepare", "optimise", "compose",
            "check", "quality"), GPU work included: where the time goes, for benchmarks.
        working_factors: (N,) how much each face's photo was area-averaged for the optimisation
            (1: its native resolution; a large face's change is upsampled, `facecloak.cloak.scale`).
        to_write: with a lossy ``stored_as``, per photo, the pixels to hand to its writer, whose
            file then decodes to ``images``; None where ``images`` are what to write. Encoding
            ``images`` themselves quantises the change a second time (`Cloak._hold_as_written`).
    """

    images: list[Tensor]
    model_names: tuple[str, ...]
    thresholds: Tensor
    distance: Tensor
    distance_jpeg: Tensor
    found_after_jpeg: Tensor
    dssim: Tensor
    psnr: Tensor
    linf: Tensor
    ciede_mean: Tensor
    ciede_p99: Tensor
    steps: Tensor
    protected: Tensor
    seconds: float
    settings: dict = field(default_factory=dict)
    reference_photos: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    working_factors: Tensor | None = None
    checked_after_upload: bool = True
    """False for a cloak made with ``verify=False``: no re-detection ran, so nothing was or was not found."""
    to_write: list[Tensor] | None = None

    def records(self, faces: Faces) -> list[dict]:
        """One JSON-ready dict per face, in ``faces`` order (`facecloak.cloak.verify.face_records`)."""
        return face_records(self, faces)


class Cloak:
    """Base of every cloak method: ``cloak(images, faces) -> CloakResult``.

    Args:
        models: face models to attack at once (an ensemble is just several).
        level: preset budget, "low", "mid" or "high" (see `LEVELS`).
        steps, max_dssim, max_linf, aim: override single fields of the preset.
        robust_to: simulated upload transformations to optimise through (see `ROBUSTNESS`).
        eot_samples: random draws per step; more is steadier and slower. Default 1 on the CPU
            (more steps for the same time serve better), 4 on a GPU (batched almost for free).
        region_scale: face region (the only pixels changed) relative to the detection box.
        measured_on: where the DSSIM and CIEDE2000 caps hold and are reported (`MEASURED_ON`):
            "face" (default) on the detection box, the region around it held to `REGION_SHARE`
            of them; "region" on the region alone.
        diversity: input diversity (DI, Xie et al. 2019): share of draws whose chips are also
            zoomed and shifted at random, so the change does not fit one exact crop.
        smoothing: translation-invariant gradients (TI, Dong et al. 2019): Gaussian sigma, in chip
            pixels of the first model, that each step's gradient is smoothed with (0: off).
        update: "adam" or "momentum" (MI-FGSM sign steps on the accumulated normalised gradient).
        dropout: feature dropout (DFANet, Zhong & Deng 2021): share of every convolution's outputs
            zeroed at random in each step's forward pass, a self-ensemble of each model (0: off).
        skip_gradient: share of the gradient residual branches pass back (the skip gradient
            method, Wu et al. 2020; `facecloak.cloak.skip_gradient`); 1: off.
        feature_weight: weight of the intermediate-feature loss (`facecloak.cloak.features`):
            each model's features at ``feature_depth`` are pushed away from the clean face's,
            seen through the same random upload; 0: off.
        feature_depth: which convolution, as a relative depth (0 first, 1 last).
        models_per_step: how many of ``models`` each step goes through, a random subset per step
            that gives every model the same share of the steps (a stochastic ensemble;
            `Cloak._model_schedule`); None: `default_models_per_step`. The loss, the stopping rule
            and the after-upload check still cover every model.
        spend_budget: keep optimising for all ``steps`` (pulling each model to `SPEND_TARGET`)
            instead of stopping once the attacked models pass the aim, then enlarge the change up
            to the DSSIM cap (`_fill`): the margin on the surrogates is only a proxy, and the
            extra distance is what transfers.
        average_iterates: with ``spend_budget``, return the running average of the last steps'
            changes instead of the last one (`AVERAGE_DECAY`, `AVERAGE_FROM`; only for budgets of
            `AVERAGE_MIN_STEPS` or more).
        detector: detector used to check each cloak after a real JPEG re-encode (default MTCNN).
        verify: run that check (the evaluator measures separately and may switch it off).
        precision: "float32" or "bfloat16" for the models' passes inside the optimisation (the
            distances, the budget and the after-upload check are always float32). Default:
            `cpu_precision()` on the CPU, `CUDA_PRECISION` on a GPU.
        seed: seed of the random draws; the same seed gives the same perturbation on the same
            device and thread count (threaded float reductions differ in their last bits).
    """

    name = "base"
    embeds_clean_faces = True
    """Whether `prepare` and `references` read the clean faces' embeddings (a cloak given the
    embeddings to leave does not: the call then skips a pass of every model over every face)."""

    def __init__(
        self,
        models: Sequence[Embedder],
        level: str = "mid",
        *,
        steps: int | None = None,
        max_dssim: float | None = None,
        max_linf: float | None = None,
        aim: float | None = None,
        robust_to: Sequence[str] = ROBUSTNESS,
        eot_samples: int | None = None,
        region_scale: float = REGION_SCALE,
        measured_on: str = "face",
        feather: float = 0.15,
        diversity: float = DEFAULT_DIVERSITY,
        smoothing: float = DEFAULT_SMOOTHING,
        update: str = "adam",
        spend_budget: bool = DEFAULT_SPEND_BUDGET,
        average_iterates: bool = DEFAULT_AVERAGE_ITERATES,
        dropout: float = DEFAULT_DROPOUT,
        skip_gradient: float = DEFAULT_SKIP_GRADIENT,
        feature_weight: float = DEFAULT_FEATURE_WEIGHT,
        feature_depth: float = DEFAULT_FEATURE_DEPTH,
        models_per_step: int | None = None,
        budget: CloakBudget | None = None,
        detector: FaceDetector | None = None,
        verify: bool = True,
        precision: str | None = None,
        seed: int | None = 0,
    ) -> None:
        if not models:
            raise InvalidInputError("a cloak needs at least one face model")
        check_choice(level, tuple(LEVELS), "level")
        for item in robust_to:
            check_choice(item, ROBUSTNESS, "robust_to")
        check_choice(update, UPDATES, "update")
        check_choice(measured_on, MEASURED_ON, "measured_on")
        overrides = {"steps": steps, "max_dssim": max_dssim, "max_linf": max_linf, "aim": aim}
        if steps is not None:
            overrides["extra_steps"] = 0  # steps asked for are all the steps
        base_budget = budget if budget is not None else LEVELS[level]
        self.budget = replace(base_budget, **{k: v for k, v in overrides.items() if v is not None})
        _check_budget(self.budget)
        given = [models] if isinstance(models, (str, Embedder)) else list(models)
        if isinstance(models, (str, Embedder)) or not all(isinstance(m, Embedder) for m in given):
            # a name was split into its letters, then an AttributeError on the first
            raise InvalidInputError(
                "models must be a list of loaded face models (facecloak.models.create_embedder(name)), "
                f"got {models!r:.80}"
            )
        self.models = given
        self.level = level
        if models_per_step is None:
            models_per_step = default_models_per_step(len(self.models))
        if not 1 <= models_per_step <= len(self.models):
            raise InvalidInputError(
                f"models_per_step must be in [1, {len(self.models)}], got {models_per_step}"
            )
        self.models_per_step = int(models_per_step)
        # the command line's ranges: out of them (NaN too) a cloak ran on quietly weakened, or
        # failed only after its whole optimisation
        check_range("diversity", diversity, 0.0, 1.0)
        check_range("smoothing", smoothing, 0.0, math.inf)
        check_range("feather", feather, 0.0, MAX_CLOAK_FEATHER)
        self.simulator = UploadSimulator(robust_to=tuple(robust_to), diversity=float(diversity))
        self.smoothing = float(smoothing)
        self.update = update
        self.spend_budget = bool(spend_budget)
        self.average_iterates = bool(average_iterates)
        if not 0 <= dropout < 1:
            raise InvalidInputError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        if not 0 < skip_gradient <= 1:
            raise InvalidInputError(f"skip_gradient must be in (0, 1], got {skip_gradient}")
        self.skip_gradient = float(skip_gradient)
        if feature_weight < 0 or not 0 <= feature_depth <= 1:
            raise InvalidInputError("feature_weight must be >= 0 and feature_depth in [0, 1]")
        self.feature_weight, self.feature_depth = float(feature_weight), float(feature_depth)
        if not is_finite_number(region_scale) or region_scale < MIN_SCALE:
            # NaN was a ValueError deep in the crops; under 1 the change missed most of the face
            raise InvalidInputError(
                f"region_scale must be a finite number >= {MIN_SCALE}, got {region_scale!r}"
            )
        self.region_scale = float(region_scale)
        self.measured_on = measured_on
        self.feather = float(feather)
        self._detector = detector
        self.verify = verify
        self.seed = check_seed(seed)
        self.device = model_device(self.models[0])
        default_draws = 1 if self.device.type == "cpu" else 4
        if eot_samples is not None and (
            not is_whole_number(eot_samples) or eot_samples < 1
        ):  # "x" was a raw ValueError; 0 and 2.7 quietly ran 1 and 2 draws
            raise InvalidInputError(f"eot_samples must be a whole number >= 1, got {eot_samples!r}")
        self.eot_samples = int(eot_samples if eot_samples is not None else default_draws)
        if precision is None:
            precision = cpu_precision() if self.device.type == "cpu" else CUDA_PRECISION
        check_choice(precision, PRECISIONS, "precision")
        self.precision = precision
        self.thresholds = torch.tensor([m.card.match_threshold for m in self.models], device=self.device)

    def __repr__(self) -> str:
        names = ", ".join(m.card.name for m in self.models)
        return f"{type(self).__name__}(models=[{names}], level={self.level!r}, budget={self.budget})"

    # -- what subclasses define -------------------------------------------------------------
    def prepare(
        self,
        clean: list[Tensor],
        faces: Faces,
        identity: str | None = None,
        references: PersonReferences | None = None,
    ) -> None:
        """Called once per call with the clean embeddings (one (N, D_m) per model).

        ``identity`` is the caller's per-person key (None: the cloak's own, if it has one).
        ``references``: per-face references from an earlier call (`__call__`); a cloak that
        does not push from a person's photos has no use for them.
        """

    def objective(self, embeddings: list[Tensor | None], clean: list[Tensor], face_index: Tensor) -> Tensor:
        """(n,) loss to minimise per face, from this draw's (n, D_m) embeddings per model.

        A model the step left out (``models_per_step``) has None in its place: skip it.
        """
        raise NotImplementedError

    def progress(self, m: int, embedding: Tensor, clean: list[Tensor], face_index: Tensor) -> Tensor:
        """(n,) how far each face of this draw is, in thresholds of model ``m``: the stopping rule's measure.

        Distance to the face's reference (``clean``, from `references`) by default; a cloak with
        several embeddings to leave measures the nearest of them.
        """
        return self.models[m].distance(embedding, clean[m][face_index]) / self.thresholds[m]

    def references(self, clean: list[Tensor]) -> PersonReferences:
        """What each face must end far from, per model, and how many clean photos that averages.

        The face's own clean embedding by default; a person-level cloak returns its person's mean,
        so the honest check measures what the cloak aimed at.
        """
        return clean, torch.ones(len(clean[0]) if clean else 0, dtype=torch.long)

    # -- the contract -----------------------------------------------------------------------
    def __call__(
        self,
        images: Tensor | Sequence[Tensor],
        faces: Faces,
        on_step: StepCallback | None = None,
        *,
        identity: str | None = None,
        stored_as: Sequence[StoredAs | None] | None = None,
        references: PersonReferences | None = None,
    ) -> CloakResult:
        """Cloak every face in ``images``, then check each after a simulated upload and measure it.

        Args:
            images: (B, 3, H, W) in [0, 1], or a list of (3, H_i, W_i).
            faces: the faces to cloak, from `facecloak.detect`.
            on_step: optional progress hook, called after every step (see `StepCallback`).
            identity: the person these photos show, as a key (targeted cloaks pull every photo
                of one key the same way); None keeps the cloak's own key.
            stored_as: per photo, how its file will hold it (`StoredAs`: e.g. a JPEG's encoder
                and decoder), or None for 8-bit pixels as they are. The caps then hold, and the
                check runs, on the photo as written (`_hold_as_written`).
            references: per model (N, D) what each face is pushed from, and (N,) how many photos
                each averages, instead of those this call would find: an escalation cloaks again
                a few faces of a call from the person means that call found
                (`facecloak.protection.escalate`), not from those few alone. Used by a cloak
                that pushes from a person's photos (`UntargetedCloak`); others ignore them.
        """
        run = self._perturb(images, faces, on_step, identity, stored_as, references)
        result = self._result(
            run.photos,
            run.cloaked,
            run.faces,
            run.references,
            run.steps,
            run.started,
            run.clock,
            run.alignments,
            run.dssim,
            run.to_write,
        )
        return result if run.factors is None else replace(result, working_factors=run.factors.float())

    def perturb(
        self, images: Tensor | Sequence[Tensor], faces: Faces, *, identity: str | None = None
    ) -> list[Tensor]:
        """The cloaked photos as `__call__` stores them, without its check and measures.

        For a caller that checks the faces itself (the replacer's finish runs its own check, on
        every recogniser, of the photo it keeps): the check's detection and embeddings and the
        quality measures are a few percent of a cloak's time.
        """
        return self._perturb(images, faces, None, identity).cloaked

    def _perturb(
        self,
        images: Tensor | Sequence[Tensor],
        faces: Faces,
        on_step: StepCallback | None,
        identity: str | None,
        stored_as: Sequence[StoredAs | None] | None = None,
        references: PersonReferences | None = None,
    ) -> _Run:
        """Everything `__call__` does before its check: the photos as stored, and what the check needs."""
        started = time.perf_counter()
        clock = _StageClock(self.device)
        photos = check_image_list(images)
        check_face_values(check_faces(faces, len(photos)), [photo.shape[-2:] for photo in photos])
        _check_stored_as(stored_as, len(photos))
        photos = [photo.to(self.device, torch.float32) for photo in photos]
        faces = faces.to("cpu")
        if len(faces) == 0:  # nothing to cloak, nor to check
            nothing = torch.zeros(0, dtype=torch.long)
            stored = [_as_stored(photo) for photo in photos]
            return _Run(photos, stored, faces, started, clock, ([], nothing), nothing)
        # one alignment per model, shared by the clean embedding, the crops and the cloaked output
        alignments = [model_alignment(photos, faces, m.card) for m in self.models]
        native = photos, faces, alignments
        # embedded at native resolution, as every measure and the check read the face: embedded on
        # its working photo, a large face's reference was 0.045 (dlib) from its own native face
        clean = (
            [
                embed_faces(photos, faces, model, chip_from_image=alignment)
                for model, alignment in zip(self.models, alignments)
            ]
            if self.embeds_clean_faces
            else []
        )
        # a face every model reads area-averaged is worked on at that scale (`facecloak.cloak.scale`)
        factors = working_factors(faces, alignments)
        working = working_photos(photos, faces, factors, stored=_as_stored)
        if not working.native:
            photos, faces = working.photos, working.faces
            alignments = [model_alignment(photos, faces, m.card) for m in self.models]
        self.prepare(clean, faces, identity, references)
        # what the objective pushes from: progress, stopping and the honest check all measure it
        references = self.references(clean)
        clock.lap("embed")
        # no seed: a fresh generator seeds itself (`torch.seed()` re-seeded the caller's global one too)
        generator = torch.Generator()
        if self.seed is not None:
            generator.manual_seed(self.seed)
        else:
            generator.seed()
        buckets = build_buckets(
            photos,
            faces,
            self.models,
            alignments,
            region_scale=self.region_scale,
            feather=self.feather,
            max_faces=MAX_BUCKET_FACES if self.device.type == "cpu" else GPU_BUCKET_FACES,
        )
        dropout_generator = torch.Generator(device=self.device).manual_seed(int(generator.initial_seed()))
        clock.lap("prepare")
        with (
            feature_dropout(self.models, self.dropout, dropout_generator),
            skip_gradient(self.models, self.skip_gradient),
        ):
            deltas, steps = self._optimise(buckets, faces, references[0], generator, on_step)
        clock.lap("optimise")
        cloaked, dssim = self._compose_within_budget(photos, faces, buckets, deltas)
        if not working.native:
            # measured again on the photos as stored: the caps held at the working scale
            cloaked, dssim = working.to_native(native[0], cloaked, _as_stored), None
            photos, faces, alignments = native
        to_write = None
        if stored_as is not None and any(store is not None for store in stored_as):
            # measured from the photos as their files would hold them uncloaked, as the caps are
            to_write, cloaked, dssim, photos = self._hold_as_written(photos, cloaked, faces, stored_as)
        clock.lap("compose")
        return _Run(
            photos, cloaked, faces, started, clock, references, steps, alignments, dssim, factors, to_write
        )

    # -- the loop ---------------------------------------------------------------------------
    def _optimise(
        self,
        buckets: list[Bucket],
        faces: Faces,
        clean: list[Tensor],
        generator: torch.Generator,
        on_step: StepCallback | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        budget = self.budget
        lr = budget.step_size / PIXEL_LEVELS
        steps_taken = torch.zeros(len(faces), dtype=torch.long)
        active = torch.ones(len(faces), dtype=torch.bool)
        reached = torch.zeros(len(faces), dtype=torch.long)  # consecutive steps at or past the aim
        latest = torch.zeros(len(faces))  # for on_step: each face's last distance / threshold
        seen = torch.zeros(len(faces), len(self.models))  # each model's latest ratio, per face
        recent = torch.zeros(len(faces), len(self.models))  # and its running mean
        deltas = [torch.zeros_like(bucket.crops) for bucket in buckets]
        # the running average of the steps' changes (`AVERAGE_FROM`), returned in their place
        averaging = self.spend_budget and self.average_iterates and budget.steps >= AVERAGE_MIN_STEPS
        average_from = max(1, math.ceil(AVERAGE_FROM * budget.steps))
        averages: list[Tensor | None] = [None] * len(buckets)
        # each step works on the rectangle that holds the bucket's regions (the masks are 0
        # outside it); the chips, which read the whole crop, see it pasted into the clean crop
        region_boxes = [self._boxes_in_crop(bucket, faces) for bucket in buckets]
        rects = [
            _changed_rectangle(boxes, bucket.crops.shape[-2:]) for boxes, bucket in zip(region_boxes, buckets)
        ]
        rect_boxes = [
            _boxes_in_rectangle(self._measured_boxes(bucket, faces), rect)
            for bucket, rect in zip(buckets, rects)
        ]
        rect_crops = [bucket.crops[..., ys, xs] for bucket, (ys, xs) in zip(buckets, rects)]
        rect_masks = [bucket.masks[..., ys, xs] for bucket, (ys, xs) in zip(buckets, rects)]
        first = [torch.zeros_like(crops) for crops in rect_crops]
        second = [torch.zeros_like(crops) for crops in rect_crops]
        allowances = [
            allowance if allowance.ndim == 0 else allowance[..., ys, xs]
            for allowance, (ys, xs) in zip((self._allowance(bucket) for bucket in buckets), rects)
        ]
        sigmas = [self._smoothing_sigmas(bucket) for bucket in buckets]
        chroma = [self._chroma_shares(bucket) for bucket in buckets]
        clean_means = [quality.reference_means(crops) for crops in rect_crops]  # fixed: once
        beta1, beta2 = ADAM_BETAS
        dssim_cap = budget.max_dssim * DSSIM_SAFETY
        extra = budget.extra_steps if self.spend_budget else 0
        last_step = budget.steps + extra
        schedule = self._model_schedule(last_step, generator)
        for step in range(1, last_step + 1):
            if not bool(active.any()):
                break
            chosen = schedule[step - 1]
            if step > budget.steps and len(chosen) < len(self.models):
                chosen = _with_laggard(chosen, recent[active])
            for b, bucket in enumerate(buckets):
                rows = active[bucket.faces].nonzero()[:, 0]
                if len(rows) == 0:
                    continue
                # every face of the bucket still active (always, when the whole budget is spent):
                # slices read the per-face state in place, instead of gathering and scattering
                # copies of it every step
                gathered = len(rows) < len(bucket.faces)
                index = rows.to(self.device) if gathered else slice(None)
                on_cpu = rows if gathered else slice(None)
                face_index = bucket.faces[rows]
                ys, xs = rects[b]
                delta = deltas[b][index][..., ys, xs].clone().requires_grad_(True)
                crops, masks = bucket.crops[index], rect_masks[b][index]
                clean_rect = rect_crops[b][index]
                changed = _within_levels(clean_rect + masks * delta)
                adversarial = crops.clone()
                adversarial[..., ys, xs] = changed
                loss, ratios = self._draws(
                    adversarial,
                    bucket,
                    index,
                    clean,
                    face_index,
                    generator,
                    chosen=chosen,
                    clean_crops=crops,
                )
                ratios = ratios.cpu()
                # a model this step left out keeps its last ratio for the stopping rule
                ratios = seen[face_index] = torch.where(ratios.isnan(), seen[face_index], ratios)
                # one draw's ratio swings by a fifth from step to step: the extra steps go by a
                # running mean of the last few
                recent[face_index] = (
                    ratios if step == 1 else RECENT_DECAY * recent[face_index] + (1 - RECENT_DECAY) * ratios
                )
                means = tuple(m[index] for m in clean_means[b])
                boxes = rect_boxes[b][on_cpu]
                total = loss + self._dssim_penalty(clean_rect, changed, boxes, means)
                (gradient,) = torch.autograd.grad(total.sum(), delta)
                gradient = _smooth(gradient, sigmas[b][on_cpu]) * masks
                with torch.no_grad():
                    if self.update == "momentum":
                        norm = gradient.abs().flatten(1).mean(1).clamp_min(GRADIENT_NORM_FLOOR)
                        norm = norm.view(-1, 1, 1, 1)
                        m = first[b][index].mul_(MOMENTUM_DECAY).add_(gradient / norm)
                        if gathered:
                            first[b][index] = m
                        direction = m.sign()
                    else:
                        m = first[b][index].mul_(beta1).add_(gradient, alpha=1 - beta1)
                        v = second[b][index].mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
                        if gathered:
                            first[b][index], second[b][index] = m, v
                        m_hat = m / (1 - beta1**step)
                        v_hat = v / (1 - beta2**step)
                        direction = m_hat / (v_hat.sqrt() + ADAM_EPSILON)
                    allowance = allowances[b] if allowances[b].ndim == 0 else allowances[b][index]
                    updated = limit_change(delta - lr * direction, allowance, chroma[b][index])
                    updated = (clean_rect + updated).clamp(0, 1) - clean_rect  # stay a valid image
                    if step % DSSIM_CHECK_EVERY == 0 or step in (budget.steps, last_step):
                        updated = enforce_dssim(
                            clean_rect,
                            masks,
                            updated,
                            boxes,
                            dssim_cap,
                            reference=means,
                            shares=self._box_shares,
                        )
                    if gathered:
                        deltas[b][index, :, ys, xs] = updated
                    else:
                        deltas[b][..., ys, xs] = updated
                if averaging and step >= average_from:
                    averages[b] = _running_average(averages[b], deltas[b])
                steps_taken[face_index] += 1
                stop_at = SPEND_TARGET if self.spend_budget else budget.aim
                at_aim = (ratios >= stop_at).all(dim=1)
                reached[face_index] = torch.where(
                    at_aim, reached[face_index] + 1, torch.zeros_like(reached[face_index])
                )
                active[face_index] = reached[face_index] < STEADY_STEPS
                latest[face_index] = ratios.amin(dim=1)
            if step == budget.steps and extra:
                # the budget is spent: only faces some model still sees near their reference go on
                active &= recent.amin(dim=1) < EXTRA_STEPS_BELOW
            if on_step is not None:
                going_on = step >= budget.steps and bool(active.any())
                on_step(step, last_step if going_on else budget.steps, ~active, latest.clone())
        if averaging:
            deltas = [delta if average is None else average for delta, average in zip(deltas, averages)]
        return deltas, steps_taken

    def _dssim_penalty(
        self, crops: Tensor, adversarial: Tensor, boxes: Tensor, means: tuple[Tensor, Tensor]
    ) -> Tensor:
        """(n,) the loss's DSSIM term: `DSSIM_PENALTY` x each face's excess over `DSSIM_PENALTY_FROM`.

        Measured once, with its graph: where no face is past the onset (the hard cap keeps them
        under) the term is exactly 0, and returning a constant drops the graph, so its backward
        pass is skipped.
        """
        dssim = quality.box_dssim(crops, adversarial, boxes, means, self._box_shares)
        excess = dssim / self.budget.max_dssim - DSSIM_PENALTY_FROM
        if not bool((excess > 0).any()):
            return torch.zeros_like(excess.detach())
        return DSSIM_PENALTY * torch.relu(excess)

    def _model_schedule(self, steps: int, generator: torch.Generator) -> list[list[int]]:
        """Indices of the models each of ``steps`` steps goes through: all, or a balanced subset.

        With a subset, the steps run in rounds of one step per model: each round draws a random
        order of the models, and its step j takes the ``models_per_step`` models that follow
        position j in that order (cyclically). Every model is in exactly ``models_per_step`` steps
        of each round, so over the steps each gets the same share, give or take a step. Drawing
        each step's subset independently would leave one model in, by chance, 31 of 40 steps as
        easily as 23: the cost and the balance of the ensemble would vary from face to face.
        """
        count = len(self.models)
        if self.models_per_step >= count:
            return [list(range(count))] * steps
        schedule: list[list[int]] = []
        while len(schedule) < steps:
            order = torch.randperm(count, generator=generator).tolist()
            for start in range(min(count, steps - len(schedule))):
                schedule.append(sorted(order[(start + i) % count] for i in range(self.models_per_step)))
        return schedule

    @property
    def target_ratio(self) -> float:
        """Distance, in thresholds, each model is pulled to (the objectives' aim)."""
        return SPEND_TARGET if self.spend_budget else self.budget.aim + OBJECTIVE_MARGIN

    def _allowance(self, bucket: Bucket) -> Tensor:
        """Per-pixel brightness allowance of a bucket's crops: (n, 1, h, w), or a number if flat."""
        eps = self.budget.max_linf / PIXEL_LEVELS
        if self.budget.jnd_scale is None:
            return torch.tensor(eps, device=self.device)
        return (self.budget.jnd_scale * jnd_map(bucket.crops)).clamp(max=eps)

    def _chroma_shares(self, bucket: Bucket) -> Tensor:
        """(n, 1, 1, 1) colour allowance of each face, as a share of its brightness allowance.

        The level's share, and none on a grey face (a black-and-white photo): any colour there is
        a tint a viewer sees at once, and it would turn a grey file into a colour one.
        """
        colour = ~transforms.is_grey(bucket.crops)
        return colour.to(bucket.crops).mul_(self.budget.chroma_share).view(-1, 1, 1, 1)

    def _smoothing_sigmas(self, bucket: Bucket) -> Tensor:
        """(n,) TI smoothing sigma of each face, in crop pixels (``smoothing`` is in chip pixels)."""
        if self.smoothing <= 0:
            return torch.zeros(len(bucket.faces))
        chip_per_crop = affine_scale(bucket.chip_from_crop[0].double().cpu()).float()
        return self.smoothing / chip_per_crop.clamp_min(1e-6)

    def _draws(
        self,
        adversarial: Tensor,
        bucket: Bucket,
        rows: Tensor | slice,
        clean: list[Tensor],
        face_index: Tensor,
        generator: torch.Generator,
        *,
        chosen: Sequence[int] | None = None,
        clean_crops: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mean loss over ``eot_samples`` random uploads, and the worst (n, M) distance ratios seen.

        ``rows``: the bucket's rows these faces are (an index, or ``slice(None)`` for all).

        ``chosen``: the models this step goes through (default all); the others' embeddings reach
        the objective as None and their ratios come back NaN. With the intermediate-feature loss
        on, ``clean_crops`` go through the same uploads and alignments as the cloaked ones, so
        their features differ only by the cloak.
        """
        n, draws = adversarial.shape[0], self.eot_samples
        features = self.feature_weight > 0 and clean_crops is not None
        pairs = torch.cat([adversarial, clean_crops]) if features else adversarial
        copies = 2 if features else 1  # a face and its clean original: the same upload
        uploaded = [self.simulator.transform_pixels(pairs, generator, copies=copies) for _ in range(draws)]
        crops = torch.cat([u[:n] for u in uploaded])
        clean_uploaded = torch.cat([u[n:] for u in uploaded]) if features else None
        device_index = face_index.to(self.device)
        chosen = range(len(self.models)) if chosen is None else chosen
        embeddings: list[Tensor | None] = [None] * len(self.models)
        worst = torch.full((n, len(self.models)), math.nan, device=adversarial.device)
        pushed = torch.zeros(n * draws, device=adversarial.device)
        for m in chosen:
            model = self.models[m]
            size = model.card.input_size
            alignment = bucket.chip_from_crop[m][rows]
            jittered = torch.cat(
                [self.simulator.jitter_alignment(alignment, size, generator) for _ in range(draws)]
            )
            flips = None
            if "flip" in self.simulator.robust_to:  # scrapers average a face with its mirror image
                flips = self._flips(n * draws, generator).to(adversarial.device)
            chips = _flipped(sample_chips(crops, jittered, model, bucket.factors[m]), flips)
            if features:
                clean_chips = sample_chips(clean_uploaded, jittered, model, bucket.factors[m])
                clean_chips = _flipped(clean_chips, flips)
                with FeatureTap(model, self.feature_depth) as tap, self._autocast():
                    model(clean_chips)
                    reference_features = tap.value.detach().float()
                    embedding = model(chips).float()
                    displacement = feature_displacement(tap.value.float(), reference_features)
                pushed = pushed + displacement
            else:
                with self._autocast():
                    embedding = model(chips).float()
            embeddings[m] = embedding
            ratio = self.progress(m, embedding.detach(), clean, device_index.repeat(draws))
            worst[:, m] = ratio.view(draws, n).amin(0)
        loss = self.objective(embeddings, clean, face_index.repeat(draws))
        loss = (loss - self.feature_weight * pushed / len(chosen)).view(draws, n).mean(0)
        return loss, worst

    def _autocast(self) -> torch.autocast:
        """The models' passes in ``precision`` (a no-op context in float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16")

    @staticmethod
    def _flips(count: int, generator: torch.Generator) -> Tensor:
        """(count, 1, 1, 1) random booleans: which chips of this draw to mirror."""
        return (torch.rand(count, generator=generator) < FLIP_PROBABILITY).view(-1, 1, 1, 1)

    def _boxes_in_crop(self, bucket: Bucket, faces: Faces, scale: float | None = None) -> Tensor:
        """(n, 4) integer region boxes relative to each crop, clipped to its valid area.

        ``scale``: the boxes' size relative to the detection box (default: the region's).
        """
        regions = face_regions(faces.select(bucket.faces), self.region_scale if scale is None else scale)
        x0 = (regions[:, 0].floor() - bucket.origins[:, 0]).clamp_min(0)
        y0 = (regions[:, 1].floor() - bucket.origins[:, 1]).clamp_min(0)
        x1 = torch.minimum(regions[:, 2].ceil() + 1 - bucket.origins[:, 0], bucket.sizes[:, 0].float())
        y1 = torch.minimum(regions[:, 3].ceil() + 1 - bucket.origins[:, 1], bucket.sizes[:, 1].float())
        return torch.stack([x0, y0, x1, y1], dim=1).long()

    @property
    def _box_scales(self) -> tuple[float, ...]:
        """The boxes the caps hold on, relative to the detection box: the face's first (`measured_on`)."""
        return (1.0, self.region_scale) if self.measured_on == "face" else (self.region_scale,)

    @property
    def _box_shares(self) -> tuple[float, ...]:
        """Each of `_box_scales`' share of the caps."""
        return (1.0, REGION_SHARE) if self.measured_on == "face" else (1.0,)

    def _measured_boxes(self, bucket: Bucket, faces: Faces) -> Tensor:
        """(n, K, 4) the boxes each face's caps hold on, relative to its crop (`_box_scales`)."""
        return torch.stack([self._boxes_in_crop(bucket, faces, scale) for scale in self._box_scales], dim=1)

    def _compose_within_budget(
        self, photos: list[Tensor], faces: Faces, buckets: list[Bucket], deltas: list[Tensor]
    ) -> tuple[list[Tensor], Tensor]:
        """Paste every face's change into its photo, rounded to 8 bits as it will be stored.

        Where that rounding, or neighbouring faces' overlapping changes, push a face past the DSSIM
        cap, the changes near it are scaled down until every face fits. Returns the photos and each
        face's (N, K) DSSIM in them over its `_measured_boxes` (the report's: not measured twice).
        """
        cap = self.budget.max_dssim * DSSIM_SAFETY
        regions = face_regions(faces, self.region_scale)
        if self.spend_budget and FILL_BUDGET:
            deltas = self._fill(faces, buckets, deltas, cap)
        if self.budget.max_ciede is not None:
            deltas = self._limit_colour(faces, buckets, deltas, self.budget.max_ciede)
        scale = torch.ones(len(faces))
        stored_photos = [_as_stored(photo) for photo in photos]  # once: only the face crops change
        for round_ in range(_LAST_COMPOSE_ROUND + 2):
            scaled = [
                delta * scale[bucket.faces].to(delta).view(-1, 1, 1, 1)
                for bucket, delta in zip(buckets, deltas)
            ]
            cloaked = paste_perturbations(
                photos, faces, buckets, scaled, unchanged=stored_photos, finish=_as_stored
            )
            dssims = self._stored_dssim(cloaked, faces, buckets)
            dssim = quality.largest_share(dssims, self._box_shares)  # what the cap holds
            over = dssim > cap
            if not bool(over.any()) or round_ > _LAST_COMPOSE_ROUND:
                return cloaked, dssims
            for k in over.nonzero()[:, 0].tolist():
                same_photo = faces.image_index == faces.image_index[k]
                touching = same_photo & boxes_overlap(regions[k], regions)
                scale[touching] *= _shrink(float(dssim[k] / cap), round_)
        return cloaked, dssims

    def _hold_as_written(
        self,
        originals: list[Tensor],
        cloaked: list[Tensor],
        faces: Faces,
        stored_as: Sequence[StoredAs | None],
    ) -> tuple[list[Tensor], list[Tensor], Tensor, list[Tensor]]:
        """The photos to write, each change scaled down until its faces fit the cap in its file.

        A lossy output encodes the change again: a JPEG edited block by block quantises it with the
        input's tables (on the samples and two LFW photos the face's DSSIM rose from 0.0077-0.0080 to
        0.0085-0.0106, the largest change from 16 to 20-26 levels). Each photo with a ``stored_as`` is
        encoded and decoded as written; a photo with a face over the DSSIM cap (or the mean CIEDE2000
        cap, ``max_ciede``) has its whole change scaled by the square root of cap / DSSIM
        (`COMPOSE_SHRINK` to `COMPOSE_MAX_SHRINK`), for up to `COMPOSE_ROUNDS` rounds. Returns the
        photos to hand to the writer (`CloakResult.to_write`), the same photos as their files will
        decode (what the caps, the measures and the check see), every face's (N, K) DSSIM over its
        measured boxes in the latter, and the photos as their files would hold them uncloaked, which
        that DSSIM and every other measure of the change are taken from (a whole re-encode at
        quality 10 reported its own noise as the cloak's colour change: CIEDE2000 4.8 over a cap of
        1.4). A decoded photo written as it is was quantised a second time: on a sample, up to 9
        levels on 22,285 pixels, the face's DSSIM in the file 0.0031 where 0.0029 was measured.
        """
        cap = self.budget.max_dssim * DSSIM_SAFETY
        boxes = torch.stack([face_regions(faces, scale) for scale in self._box_scales], dim=1)
        planned, written = list(cloaked), list(cloaked)
        lossy = [
            i
            for i, store in enumerate(stored_as)
            if store is not None and bool((faces.image_index == i).any())
        ]
        # measured from the photo as the same file would hold it uncloaked: a JPEG edited block by
        # block holds it exactly; a whole re-encode adds its own noise, which is not the cloak's
        # (at quality 92 it took a quarter of the face's budget, and three models fell short)
        references = list(originals)
        for i in lossy:
            references[i] = stored_as[i](originals[i]).to(cloaked[i])
        factor = dict.fromkeys(lossy, 1.0)
        for round_ in range(_LAST_COMPOSE_ROUND + 2):
            for i in lossy:
                change = cloaked[i] - originals[i]
                planned[i] = _as_stored(originals[i] + factor[i] * change) if factor[i] < 1 else cloaked[i]
                written[i] = stored_as[i](planned[i]).to(cloaked[i])
            dssims = _box_dssims_in_photos(references, written, faces, boxes)
            # each face's excess as a DSSIM's share of its cap; the colour cap's too (the file's
            # tables quantise colour again: a sample's face went from 1.39 to 1.44 over a cap of
            # 1.4), squared, as a CIEDE2000 grows about linearly with the change and a DSSIM as its
            # square. Colour on the box the report measures alone: held over the region too (to
            # `REGION_SHARE`), the rounds shrank group.jpg's faces to DSSIM 0.0025, none protected
            excess = quality.largest_share(dssims, self._box_shares) / cap
            if self.budget.max_ciede is not None:
                colour = _box_ciede_in_photos(references, written, faces, boxes[:, 0])
                excess = torch.maximum(excess, (colour / self.budget.max_ciede) ** 2)
            over = {int(faces.image_index[k]) for k in (excess > 1).nonzero()[:, 0].tolist()} & set(lossy)
            if not over or round_ > _LAST_COMPOSE_ROUND:
                return planned, written, dssims, references
            for i in over:
                factor[i] *= _shrink(float(excess[faces.image_index == i].max()), round_)
        return planned, written, dssims, references

    def _fill(self, faces: Faces, buckets: list[Bucket], deltas: list[Tensor], cap: float) -> list[Tensor]:
        """Enlarge each face's change until the face as stored (8 bits) reaches the DSSIM cap.

        The optimisation keeps a face under its cap (the DSSIM penalty starts below it, the hard
        cap has headroom, and rounding to 8 bits drops the smallest changes), so part of the
        allowed change goes unused. Scaling the change it found up to the cap moves the face
        further on every model, the ones it never saw included, at the visibility the level
        allows. The per-pixel limits still hold: the enlarged change is clipped again by the JND
        allowance (`limit_change`) and to a valid image. A bisection on the factor, in
        [1, `FILL_MAX_FACTOR`], over every face at once; faces already at the cap keep factor 1.
        """
        allowances = [self._allowance(bucket) for bucket in buckets]
        chroma = [self._chroma_shares(bucket) for bucket in buckets]
        regions = [self._measured_boxes(bucket, faces) for bucket in buckets]

        def enlarged(factor: Tensor) -> list[Tensor]:
            out = []
            for bucket, delta, allowance, shares in zip(buckets, deltas, allowances, chroma):
                rows = factor[bucket.faces].to(delta).view(-1, 1, 1, 1)
                change = limit_change(delta * rows, allowance, shares)
                out.append(torch.where(rows > 1, (bucket.crops + change).clamp(0, 1) - bucket.crops, delta))
            return out

        def measure(changes: list[Tensor]) -> Tensor:
            # on each face's own crop, rounded as stored: the photo's value except where two faces'
            # regions overlap, which the compose step after this one checks on the whole photo
            values = torch.zeros(len(faces))
            for bucket, change, boxes in zip(buckets, changes, regions):
                stored = _as_stored((bucket.crops + bucket.masks * change).clamp(0, 1))
                values[bucket.faces] = (
                    quality.box_dssim(bucket.crops, stored, boxes, shares=self._box_shares).float().cpu()
                )
            return values

        now = measure(deltas)
        under = now < cap
        if not bool(under.any()):
            return deltas
        low = torch.ones(len(faces))
        high = torch.where(under, FILL_MAX_FACTOR, 1.0)
        at_high = measure(enlarged(high))
        factor = largest_factor_under_cap(
            lambda f: measure(enlarged(f)), cap, low, high, low_values=now, high_values=at_high
        )
        return enlarged(factor)

    def _limit_colour(
        self, faces: Faces, buckets: list[Bucket], deltas: list[Tensor], cap: float
    ) -> list[Tensor]:
        """Scale down the colour change of each face whose mean CIEDE2000 (as stored) is over ``cap``.

        Only Cb and Cr shrink (`scale_colour`): the brightness change, which the DSSIM cap already
        bounds, is where the distance comes from. A bisection on the factor in [0, 1] over every
        face over the cap at once; a face over it on brightness alone loses all its colour change
        and stays over (its report says so).
        """
        regions = [self._measured_boxes(bucket, faces) for bucket in buckets]

        def coloured(factor: Tensor) -> list[Tensor]:
            return [
                scale_colour(delta, factor[bucket.faces].to(delta).view(-1, 1, 1, 1))
                for bucket, delta in zip(buckets, deltas)
            ]

        def measure(changes: list[Tensor], known: Tensor | None = None) -> Tensor:
            # on each face's own crop, rounded as stored, over its region's rectangle (`_quality`'s);
            # with ``known``, a bucket with no face over the cap keeps those values (its factor is 1)
            values = torch.zeros(len(faces)) if known is None else known.clone()
            for bucket, change, boxes in zip(buckets, changes, regions):
                if known is not None and not bool((known[bucket.faces] > cap).any()):
                    continue
                stored = _as_stored((bucket.crops + bucket.masks * change).clamp(0, 1))
                for start in range(0, len(stored), COLOUR_CHUNK):  # the map is float64: bound its memory
                    rows = slice(start, start + COLOUR_CHUNK)
                    values[bucket.faces[rows]] = quality.box_means(
                        quality.ciede2000_map(bucket.crops[rows].float(), stored[rows].float()),
                        boxes[rows],
                        self._box_shares,
                    ).cpu()
            return values

        first = measure(deltas)
        over = first > cap
        if not bool(over.any()):
            return deltas
        low = torch.where(over, 0.0, 1.0)
        grey = measure(coloured(low), first)  # brightness change only, for the faces over the cap
        # a face over the cap on brightness alone keeps no colour change: its bracket is [0, 0]
        high = torch.where(over & (grey > cap), 0.0, 1.0)
        factor = largest_factor_under_cap(
            lambda f: measure(coloured(f), first),
            cap,
            low,
            high,
            low_values=grey,
            high_values=torch.where(high > 0, first, grey),
        )
        return coloured(factor)

    def _stored_dssim(self, cloaked: list[Tensor], faces: Faces, buckets: list[Bucket]) -> Tensor:
        """(N, K) DSSIM of each face of the composed photos over each of its `_measured_boxes`.

        The same numbers as the per-face `_quality` (each crop holds its region whole, and
        `facecloak.quality.box_dssims` measures only inside the boxes), in a few batched passes.
        """
        values = torch.zeros(len(faces), len(self._box_scales))
        for bucket in buckets:
            stored = torch.zeros_like(bucket.crops)
            for row, n in enumerate(bucket.faces.tolist()):
                x0, y0 = (int(v) for v in bucket.origins[row].tolist())
                width, height = (int(v) for v in bucket.sizes[row].tolist())
                image = cloaked[int(faces.image_index[n])]
                stored[row, :, :height, :width] = image[:, y0 : y0 + height, x0 : x0 + width]
            boxes = self._measured_boxes(bucket, faces)
            values[bucket.faces] = quality.box_dssims(bucket.crops, stored, boxes).float().cpu()
        return values

    # -- the honest check -------------------------------------------------------------------
    @property
    def detector(self) -> FaceDetector:
        """The detector of the after-upload check (built on first use)."""
        if self._detector is None:
            self._detector = FaceDetector(device=self.device)
        return self._detector

    def _result(
        self,
        originals: list[Tensor],
        cloaked: list[Tensor],
        faces: Faces,
        references: PersonReferences,
        steps: Tensor,
        started: float,
        clock: _StageClock,
        alignments: Sequence[Tensor] | None = None,
        dssim: Tensor | None = None,
        to_write: list[Tensor] | None = None,
    ) -> CloakResult:
        """The stored photos, measured from ``references`` (`references`) and checked after upload.

        ``distance`` is read through the alignments the cloak optimised through (the clean photo's);
        the after-upload distance through a detection and alignment from scratch. ``cloaked``: the
        photos already rounded to 8 bits as they will be stored. ``dssim``: each face's (N, K) DSSIM
        in ``cloaked`` over its measured boxes, if already measured (`_compose_within_budget`).
        ``to_write``: what the writer is given where it differs from ``cloaked``, which is then the
        photos as their files will decode (`_hold_as_written`).
        """
        n, models = len(faces), len(self.models)
        stored = cloaked  # already rounded to 8 bits as stored (`_compose_within_budget`)
        reference, counts = references
        detector = self.detector if self.verify and n else None
        distance, distance_jpeg, found = measure_cloaked(
            stored, faces, reference, self.models, detector, alignments
        )
        clock.lap("check")
        metrics = self._quality(originals, stored, faces, dssim)
        clock.lap("quality")
        passes = (
            torch.nan_to_num(distance_jpeg if self.verify else distance, nan=math.inf)
            >= self.thresholds.cpu()
        )
        protected = passes.all(dim=1) if models else torch.zeros(n, dtype=torch.bool)
        return CloakResult(
            images=stored,
            model_names=tuple(m.card.name for m in self.models),
            thresholds=self.thresholds.cpu(),
            distance=distance,
            distance_jpeg=distance_jpeg,
            found_after_jpeg=found,
            checked_after_upload=bool(self.verify),
            dssim=metrics[0],
            psnr=metrics[1],
            linf=metrics[2],
            ciede_mean=metrics[3],
            ciede_p99=metrics[4],
            steps=steps,
            protected=protected,
            seconds=time.perf_counter() - started,
            settings=self.settings(),
            reference_photos=counts,
            timings=clock.laps,
            to_write=to_write,
        )

    def settings(self) -> dict:
        """What this cloak was run with, for each face's record (subclasses add their own options)."""
        return {
            "method": self.name,
            "level": self.level,
            **self.budget.__dict__,
            "diversity": self.simulator.diversity,
            "smoothing": self.smoothing,
            "update": self.update,
            "spend_budget": self.spend_budget,
            "average_iterates": self.average_iterates,
            "dropout": self.dropout,
            "skip_gradient": self.skip_gradient,
            "feature_weight": self.feature_weight,
            "feature_depth": self.feature_depth,
            "models_per_step": self.models_per_step,
            "measured_on": self.measured_on,
            "precision": self.precision,
        }

    def _quality(
        self, originals: list[Tensor], stored: list[Tensor], faces: Faces, dssim: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """(N,) DSSIM, PSNR, L-infinity, mean and 99th-percentile CIEDE2000 of each face.

        Over the first of `_box_scales` (the face's detection box, or the region where the caps
        hold on it alone). ``dssim``: the (N, K) DSSIM over every measured box already measured
        on these photos (`_stored_dssim`), taken as it is.
        """
        boxes = face_regions(faces, self._box_scales[0])
        values = torch.zeros(5, len(faces))
        for k in range(len(faces)):
            i = int(faces.image_index[k])
            x0, y0, x1, y1 = pixel_bounds(boxes[k].tolist(), *originals[i].shape[-2:])
            a = originals[i][None, :, y0:y1, x0:x1].float()
            b = stored[i][None, :, y0:y1, x0:x1].float()
            colour = quality.ciede2000_stats(a[0], b[0])
            values[:, k] = torch.tensor(
                [
                    # float32 sums leave an unchanged face a hair under 0 (-1e-05 was reported)
                    max(0.0, float(quality.dssim(a, b)[0]) if dssim is None else float(dssim[k, 0])),
                    float(quality.psnr(a, b)[0]),
                    float(quality.linf(a, b)[0]),
                    *colour,
                ]
            )
        return tuple(values)


StoredAs = Callable[[Tensor], Tensor]
"""(3, H, W) photo -> the same photo as its file will decode (`facecloak.io.as_written`)."""


def _box_dssims_in_photos(
    originals: list[Tensor], photos: list[Tensor], faces: Faces, boxes: Tensor
) -> Tensor:
    """(N, K) DSSIM of each face between ``originals`` and ``photos`` over its K ``boxes`` (N, K, 4)."""
    values = torch.zeros(boxes.shape[:2])
    for k in range(len(faces)):
        i = int(faces.image_index[k])
        for j, box in enumerate(boxes[k].tolist()):
            x0, y0, x1, y1 = pixel_bounds(box, *originals[i].shape[-2:])
            a = originals[i][None, :, y0:y1, x0:x1].float()
            b = photos[i][None, :, y0:y1, x0:x1].float()
            values[k, j] = float(quality.dssim(a, b)[0]) if a.numel() else 0.0
    return values


def _box_ciede_in_photos(
    originals: list[Tensor], photos: list[Tensor], faces: Faces, boxes: Tensor
) -> Tensor:
    """(N,) mean CIEDE2000 of each face between ``originals`` and ``photos`` over its box (N, 4).

    The measure `Cloak._quality` reports (`quality.ciede2000_stats`), so the colour cap is held
    on what the record says.
    """
    values = torch.zeros(len(faces))
    for k in range(len(faces)):
        i = int(faces.image_index[k])
        x0, y0, x1, y1 = pixel_bounds(boxes[k].tolist(), *originals[i].shape[-2:])
        values[k] = quality.ciede2000_stats(originals[i][:, y0:y1, x0:x1], photos[i][:, y0:y1, x0:x1])[0]
    return values


def _check_budget(budget: CloakBudget) -> None:
    """Refuse a budget no cloak can hold: a NaN cap compares False with every DSSIM, so it held none."""
    if not is_whole_number(budget.steps) or budget.steps < 0:
        raise InvalidInputError(f"steps must be a whole number >= 0, got {budget.steps!r}")
    for name in ("max_dssim", "max_linf", "aim"):
        value = getattr(budget, name)
        if not is_finite_number(value) or value <= 0:
            raise InvalidInputError(f"{name} must be a finite number > 0, got {value!r}")
    if budget.max_dssim > MAX_DSSIM_CAP:
        raise InvalidInputError(
            f"max_dssim must be at most {MAX_DSSIM_CAP} (the command line's), got {budget.max_dssim!r}"
        )


MAX_DSSIM_CAP = 0.5
"""The largest DSSIM cap (`--max-dssim`'s): a structure fully changed."""
MAX_CLOAK_FEATHER = 0.5
"""The softest mask edge, as a share of the region: beyond it (5.0 was accepted) the feathered
mask cut the change to nearly nothing."""


def _check_stored_as(stored_as: object, count: int) -> None:
    """One writer's decoder or None per photo: a photo past a short list was held to no file at all."""
    if stored_as is None:
        return
    if isinstance(stored_as, (str, bytes)) or not isinstance(stored_as, Sequence) or len(stored_as) != count:
        raise InvalidInputError(f"stored_as must hold one entry per photo ({count}), got {stored_as!r:.80}")
    for i, store in enumerate(stored_as):
        if store is not None and not callable(store):
            raise InvalidInputError(f"stored_as[{i}] must be callable or None, got {type(store).__name__}")


def default_models_per_step(models: int) -> int:
    """Models each step goes through by default: all of up to two, all but one from `SUBSET_FROM_MODELS`."""
    return models if models < SUBSET_FROM_MODELS else models - 1


@dataclass
class _Run:
    """What `Cloak._perturb` hands to the check: the photos (native), as stored, and the run's state.

    ``photos``: what the change is measured from: the inputs, or where a lossy ``stored_as`` was
    given, each as its file would hold it uncloaked.
    ``alignments`` and ``factors`` are None when there was no face to cloak; ``dssim`` is None
    when the stored photos were not measured yet (no face, or a face cloaked at a working scale).
    ``to_write``: where a lossy ``stored_as`` was given, the photos to hand to the writer;
    ``cloaked`` is then each as its file will decode (`Cloak._hold_as_written`).
    """

    photos: list[Tensor]
    cloaked: list[Tensor]
    faces: Faces
    started: float
    clock: _StageClock
    references: PersonReferences
    steps: Tensor
    alignments: list[Tensor] | None = None
    dssim: Tensor | None = None
    factors: Tensor | None = None
    to_write: list[Tensor] | None = None


class _StageClock:
    """Seconds per stage of one call; waits for queued GPU work at each lap so the time is its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[stage] = round(self.laps.get(stage, 0.0) + now - self._last, 4)
        self._last = now


def _with_laggard(chosen: list[int], recent: Tensor) -> list[int]:
    """``chosen`` with the model most faces lag on in place of the one they are furthest past.

    For the extra steps (`EXTRA_STEPS_BELOW`): ``recent`` (n, M) is the running distance, in
    thresholds, of the faces still going on. The step keeps its number of models (its cost), but
    the model that leaves faces short is in every step, not in ``models_per_step`` of ``M``. With
    no face under `EXTRA_STEPS_BELOW` on any model, the step keeps its own models.
    """
    lagging = (recent < EXTRA_STEPS_BELOW).sum(0)
    laggard = int(lagging.argmax())
    if laggard in chosen or int(lagging[laggard]) == 0:
        return chosen
    furthest = max(chosen, key=lambda m: float(recent[:, m].mean()))
    return sorted([m for m in chosen if m != furthest] + [laggard])


def _changed_rectangle(boxes: Tensor, size: torch.Size) -> tuple[slice, slice]:
    """(rows, columns) of a bucket's crops that hold every face's region box (``boxes``: (n, 4)).

    The whole crop where the boxes are empty.
    """
    x0, y0 = int(boxes[:, 0].min()), int(boxes[:, 1].min())
    x1, y1 = int(boxes[:, 2].max()), int(boxes[:, 3].max())
    if x1 <= x0 or y1 <= y0:
        return slice(0, size[0]), slice(0, size[1])
    return slice(y0, y1), slice(x0, x1)


def _boxes_in_rectangle(boxes: Tensor, rectangle: tuple[slice, slice]) -> Tensor:
    """(..., 4) boxes relative to the `_changed_rectangle` they lie in."""
    ys, xs = rectangle
    return boxes - torch.tensor(
        [xs.start, ys.start, xs.start, ys.start], dtype=boxes.dtype, device=boxes.device
    )


def _flipped(chips: Tensor, flips: Tensor | None) -> Tensor:
    """``chips`` with the ones marked in ``flips`` ((n, 1, 1, 1) booleans) mirrored."""
    return chips if flips is None else torch.where(flips, chips.flip(-1), chips)


def _within_levels(pixels: Tensor) -> Tensor:
    """``pixels`` clamped to [0, 1], with the gradient passed through as if unclamped.

    The change is kept inside the valid range after every step, so the clamp only mends float
    rounding; torch's clamp gives no gradient to a value at its bound, and a pixel at 0 or 255
    (black hair, a blown highlight, every pixel of a black-and-white photo) was never moved: a
    1-bit scan's face stayed unchanged at every level.
    """
    return pixels + (pixels.clamp(0, 1) - pixels).detach()


def _running_average(average: Tensor | None, delta: Tensor) -> Tensor:
    """``average`` moved toward this step's ``delta`` (`AVERAGE_DECAY`); the first step starts it."""
    if average is None:
        return delta.clone()
    return average.mul_(AVERAGE_DECAY).add_(delta, alpha=1 - AVERAGE_DECAY)


def _smooth(gradient: Tensor, sigmas: Tensor) -> Tensor:
    """Gaussian-smooth each face's (n, 3, h, w) gradient with its own sigma (TI); 0 leaves it."""
    if not bool((sigmas > 0).any()):
        return gradient
    rounded = (sigmas * 4).round() / 4  # faces of similar size share one convolution
    distinct = rounded.unique().tolist()
    if len(distinct) == 1:  # one face, or faces of one size: no gathering
        return transforms.gaussian_blur(gradient, distinct[0])
    out = gradient.clone()
    for sigma in distinct:
        if sigma > 0:
            rows = (rounded == sigma).nonzero()[:, 0].to(gradient.device)
            out[rows] = transforms.gaussian_blur(gradient[rows], sigma)
    return out


def _as_stored(image: Tensor) -> Tensor:
    """The image as it will be written: rounded to 8 bits (`facecloak.transforms.levels_8bit`)."""
    return transforms.levels_8bit(image).div(255.0).to(image)
