"""Assembling an evaluation from names, as ``facecloak evaluate`` gives them.

`EvaluationRequest` holds the CLI's names; `run_evaluation` turns them into models, attackers and a
`facecloak.protection.Protection`, runs `facecloak.evaluate.protocol.evaluate` per level, and adds
the level sweep and the leave-one-out rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from facecloak._checks import check_choice, split_names
from facecloak.datasets import list_people
from facecloak.defaults import SCRAPER_ROTATIONS
from facecloak.detect import FaceDetector
from facecloak.errors import InvalidInputError
from facecloak.evaluate.attackers import Attacker, DlibAttacker, PipelineAttacker
from facecloak.evaluate.cache import EmbeddingCache
from facecloak.evaluate.protocol import EvaluationResult, StageProgress, evaluate
from facecloak.evaluate.uploads import DEFAULT_UPLOADS
from facecloak.models.registry import Embedder
from facecloak.protection import AnonymizeFaces, CloakFaces, Protection, ReplaceFaces

PROTECTION_METHODS = ("none", "cloak", "blur", "pixelate", "mask", "replace")
"""What ``facecloak evaluate --method`` accepts."""


@dataclass(frozen=True)
class EvaluationRequest:
    """An evaluation described by names, as ``facecloak evaluate`` takes it."""

    data: Path
    method: str = "cloak"
    level: str = "mid"  # or "all"
    mode: str = "untargeted"
    escalate: bool = False  # cloak: a face that falls short is cloaked again one level up
    person_level: bool | None = None  # untargeted cloak: from the person's photos; None: the default
    models: str | None = None  # cloak's models, comma-separated; None: all available
    protected_dir: Path | None = None
    people: int = 20
    control: int = 20
    min_photos: int = 10
    probes: int = 2
    attackers: str | None = None  # comma-separated; None: all available models + dlib-cpp
    uploads: tuple[str, ...] = DEFAULT_UPLOADS
    adaptive: bool | str = False  # False, True (= "linear"), "linear", "finetune" or "both"
    adaptive_people: int = 20
    max_distractors: int | None = None
    leave_one_out: bool = False
    seed: int = 0
    cache: Path | None = None
    device: str | None = None
    donors: str | None = None  # replace: the donor bank's name or folder
    donors_per_face: int = 3
    fallback: str = "blur"  # replace: what a face no donor mix protects becomes ("blur" or "keep")
    donor_margin: float | None = None  # replace: one donor margin for every model (None: each its own)
    finish: bool = True  # replace: finish near misses with an away cloak (`FaceReplacer`)
    keep_mouth: bool = False  # replace: keep the person's own lips (`FaceReplacer`)

    def replacer_options(self) -> dict:
        """The `FaceReplacer` settings this request gives (seed aside): the replacer's and the report's."""
        return {
            "donors_per_face": self.donors_per_face,
            "fallback": self.fallback,
            "donor_margin": self.donor_margin,
            "finish": self.finish,
            "keep_mouth": self.keep_mouth,
        }


def build_attackers(names: str | None, detector: FaceDetector, device: str | None) -> list[Attacker]:
    """Attackers by name: registry models and "dlib-cpp"; default every available one."""
    from facecloak.models import available_embedders, create_embedder

    wanted = split_names(names) or available_embedders() + (["dlib-cpp"] if DlibAttacker.available() else [])
    attackers: list[Attacker] = []
    for name in wanted:
        if name == "dlib-cpp":
            if not DlibAttacker.available():
                raise InvalidInputError("attacker dlib-cpp needs dlib (pip install dlib-bin)")
            attackers.append(DlibAttacker())
        else:
            attackers.append(PipelineAttacker(create_embedder(name, device=device), detector))
    return attackers


def _cloak_options(request: EvaluationRequest, detector: FaceDetector) -> dict:
    """The keywords every cloak of this evaluation is built with (`create_cloak` drops None)."""
    return {"detector": detector, "seed": request.seed, "person_level": request.person_level}


def build_protection(
    request: EvaluationRequest, level: str, models: list[Embedder], detector: FaceDetector
) -> Protection | None:
    """The protection ``request.method`` names at ``level``; None for "none" or a protected folder."""
    from facecloak.anonymize import Anonymizer

    if request.method == "replace" and request.protected_dir is None:
        return ReplaceFaces(_replacer(request, detector))
    if request.protected_dir is not None or request.method == "none":
        return None
    if request.method == "cloak":
        return _cloak_faces(request, models, level, detector)
    return AnonymizeFaces(Anonymizer(request.method))


def _cloak_faces(
    request: EvaluationRequest, models: list[Embedder], level: str, detector: FaceDetector
) -> CloakFaces:
    """The request's cloak at ``level`` over ``models``, escalating when the request asks."""
    options = _cloak_options(request, detector)
    return CloakFaces.create(request.mode, models, level, escalate=request.escalate, **options)


def _replacer(request: EvaluationRequest, detector: FaceDetector):
    from facecloak.donor_bank import load_bank
    from facecloak.models import choose_embedders, create_embedder
    from facecloak.replace import FaceReplacer

    if not request.donors:
        raise InvalidInputError("--method replace needs --donors BANK (see `facecloak donors add`)")
    names = choose_embedders(request.models)
    models = [create_embedder(name, device=request.device) for name in names]
    return FaceReplacer(
        load_bank(request.donors), models, seed=request.seed, detector=detector, **request.replacer_options()
    )


def run_evaluation(request: EvaluationRequest, on_progress: StageProgress | None = None) -> EvaluationResult:
    """Build models, attackers and protection from ``request`` and run `evaluate` (per level if "all").

    With ``leave_one_out`` (cloak, two or more models) each model is also left out of the cloak in
    turn and measured alone: the honest estimate for a model the cloak never saw.
    """
    from facecloak.models import choose_embedders, create_embedder

    check_choice(request.method, PROTECTION_METHODS, "method")
    list_people(request.data)  # a bad data folder fails in one line before any model is built
    detector = FaceDetector(device=request.device, rotations=SCRAPER_ROTATIONS)
    attackers = build_attackers(request.attackers, detector, request.device)
    names = choose_embedders(request.models)
    if request.leave_one_out and (request.method != "cloak" or request.protected_dir or len(names) < 2):
        # it was silently ignored: a run asked for the unseen-model estimate and gave none
        raise InvalidInputError(
            "--leave-one-out needs --method cloak with two or more cloak models "
            f"(here: --method {request.method}{', a protected folder' if request.protected_dir else ''}, "
            f"{len(names)} model(s): {', '.join(names) or 'none'})"
        )
    models = (
        [create_embedder(name, device=request.device) for name in names] if request.method == "cloak" else []
    )
    cache = EmbeddingCache(request.cache)
    # a level is a cloak's: anything else would run the same evaluation three times, rows repeated
    cloaks = request.method == "cloak" and request.protected_dir is None
    if request.level == "all":
        levels = ["low", "mid", "high"] if cloaks else ["mid"]
    else:
        levels = [request.level]
    common = dict(
        max_distractors=request.max_distractors,
        people=request.people,
        control=request.control,
        min_photos=request.min_photos,
        probes=request.probes,
        seed=request.seed,
        cache=cache,
        on_progress=on_progress,
    )
    results = []
    adaptive = None
    if request.adaptive:
        adaptive = "linear" if request.adaptive is True else str(request.adaptive)
    for level in levels:
        protection = build_protection(request, level, models, detector)
        # photos protected elsewhere were reported as cloaked here, at this level, with these models
        settings = {
            "level": level if cloaks else "-",
            "mode": request.mode if cloaks else "-",
            "cloak_models": names if cloaks else [],
        }
        if cloaks and request.person_level is not None:
            settings["person_level"] = request.person_level
        if request.method == "replace":
            settings.update(donors=request.donors, **request.replacer_options())
            if isinstance(protection, ReplaceFaces):
                settings["replace_models"] = [m.card.name for m in protection.replacer.models]
        if isinstance(protection, CloakFaces):
            settings["budget"] = asdict(protection.cloak.budget)
            if protection.escalate_to is not None:
                settings["escalate_to"] = protection.escalate_to.level
        results.append(
            evaluate(
                request.data,
                protection,
                attackers,
                detector=detector,
                protected_dir=request.protected_dir,
                method=request.method if request.protected_dir is None else f"folder:{request.protected_dir}",
                uploads=request.uploads,
                adaptive=adaptive,
                adaptive_people=request.adaptive_people,
                settings=settings,
                **common,
            )
        )
    for level, partial in zip(levels, results):
        for row in partial.rows:
            row.level = level if cloaks else "-"
    result = results[-1] if len(results) == 1 else results[levels.index("mid")]
    if request.method == "replace" and isinstance(protection, ReplaceFaces):
        # the claim "no donor is a protected person" rests on the look-alike cut-off alone unless
        # the bank's people are other people: the report says which protected people are donors too
        result.settings["donor_people_among_protected"] = donor_people_among(
            protection.replacer.bank.donors, result.settings.get("protected_people", [])
        )
    if len(results) > 1:
        # the report's other figures (quality, distances, examples, timings) are those of "mid"
        result.settings["levels"] = levels
        sweep_upload = "jpeg75" if "jpeg75" in request.uploads else request.uploads[0]
        result.settings["level_sweep"] = [
            {
                "level": level,
                "upload": sweep_upload,
                "dssim": r.quality.get("face_dssim", r.quality.get("dssim", {})).get("mean", math.nan),
                "cloak_faces": r.quality.get("cloak_faces"),
                "cloak_faces_protected": r.quality.get("cloak_faces_protected"),
                "rows": [row.to_json() for row in r.rows if row.upload == sweep_upload and not row.adaptive],
            }
            for level, r in zip(levels, results)
        ]
        result.rows = [row for r in results for row in r.rows]
    if request.leave_one_out and request.method == "cloak" and len(models) >= 2:
        result.settings["leave_one_out"] = _leave_one_out(request, models, detector, cache, on_progress)
    return result


def _leave_one_out(
    request: EvaluationRequest,
    models: list[Embedder],
    detector: FaceDetector,
    cache: EmbeddingCache,
    on_progress: StageProgress | None,
) -> list[dict]:
    """Each model left out of the cloak in turn, measured alone (after JPEG 75)."""
    rows = []
    level = "mid" if request.level == "all" else request.level
    for left_out in models:
        kept = [m for m in models if m is not left_out]
        partial = evaluate(
            request.data,
            _cloak_faces(request, kept, level, detector),
            [PipelineAttacker(left_out, detector)],
            detector=detector,
            method="cloak",
            people=request.people,
            control=request.control,
            min_photos=request.min_photos,
            probes=request.probes,
            uploads=("jpeg75",),
            max_distractors=request.max_distractors,
            seed=request.seed,
            cache=cache,
            on_progress=on_progress,
        )
        for row in partial.rows:
            rows.append(
                dict(
                    row.to_json(),
                    left_out=left_out.card.name,
                    cloaked_with=",".join(m.card.name for m in kept),
                )
            )
    return rows


def donor_people_among(donors: list[dict], people: list[str]) -> list[str]:
    """Which of ``people`` (person folder names) a bank's donors come from, by their source folders.

    Donor photos are taken to be filed one folder per person, as labelled sets such as LFW are;
    a bank of loose photos names no one here.
    """
    sources = {Path(str(donor.get("source", ""))).parent.name for donor in donors}
    return sorted(set(people) & sources)
