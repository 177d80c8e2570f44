"""How much matching accuracy a scraper loses: the protocol, in three phases.

Protocol (Clearview-style scraper: detect, align, embed, nearest neighbour):
    - From a folder of people, draw the protected people and an unprotected control group (people
      with at least ``min_photos`` photos); each one's first ``probes`` photos are clean probes.
    - protect: the protected people's other photos are protected (cloak, blur, ... or taken from a
      folder of already protected photos); the control's stay clean.
    - collect: the control's gallery photos, everyone's probes and the distractors (everyone
      else's clean photos); for the adaptive attacker, protected and clean photos of people outside
      the test.
    - score: both galleries go through the upload transform under test (JPEG, downscale, blur)
      into the scraper's gallery. Each attacker (every registry model, white-box when the cloak
      attacked it, and dlib's own C++ pipeline when dlib-bin is installed) identifies each probe
      by its nearest gallery faces: one `EvaluationRow` per attacker, upload and adaptive variant.
      Protection = 1 - rank-1 of the protected; the control's rank-1 shows the attacker works.
    - An adaptive attacker (FaceCure's point) learns from photos it protected itself: a linear map
      taking protected embeddings back to clean ones, or a fine-tuned model
      (`facecloak.evaluate.adaptive`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facecloak import io
from facecloak._checks import check_choice
from facecloak.datasets import Person, Split, list_people, split_people
from facecloak.defaults import SCRAPER_ROTATIONS
from facecloak.detect import FaceDetector
from facecloak.errors import InvalidInputError, shown_path
from facecloak.evaluate.adaptive import (
    ADAPTIVE_KINDS,
    finetune_model,
    finetune_summary,
    protected_pairs_mask,
)
from facecloak.evaluate.attackers import Attacker, PipelineAttacker, embed_in_batches
from facecloak.evaluate.cache import EmbeddingCache, embed_files
from facecloak.evaluate.metrics import (
    apply_correction,
    fit_correction,
)
from facecloak.evaluate.protect import PersonProtector
from facecloak.evaluate.rows import (
    EvaluationResult,
    StageProgress,
    add_protected_distances,
    distance_summary,
    score_row,
)
from facecloak.evaluate.summary import Photos, examples, quality_summary
from facecloak.evaluate.uploads import ADAPTIVE_UPLOAD, DEFAULT_UPLOADS, UPLOAD_DESCRIPTIONS, UPLOADS
from facecloak.protection import Protection

ADAPTIVE_PHOTOS_PER_PERSON = 6
ADAPTIVE_MIN_PHOTOS = 3
EXAMPLES = 4


@dataclass
class _Protected:
    """What the protect phase gives: clean and protected gallery photos, one record per photo."""

    clean: Photos
    protected: Photos
    records: list[dict]
    seconds: float


@dataclass
class _Collected:
    """What the collect phase gives: everything the scrapers see besides the protected photos."""

    control: Photos
    probe_paths: list[Path]
    probe_labels: Tensor
    is_protected_probe: Tensor
    distractor_paths: list[Path]
    distractor_labels: Tensor
    adaptive_pairs: tuple[list[Tensor], list[Tensor]] | None


def evaluate(
    data: str | Path,
    protection: Protection | None,
    attackers: Sequence[Attacker],
    *,
    detector: FaceDetector | None = None,
    protected_dir: Path | None = None,
    method: str | None = None,
    people: int | list[str] = 20,
    control: int = 20,
    min_photos: int = 10,
    probes: int = 2,
    uploads: Sequence[str] = DEFAULT_UPLOADS,
    adaptive: str | None = None,
    adaptive_people: int = 20,
    max_distractors: int | None = None,
    seed: int = 0,
    cache: EmbeddingCache | None = None,
    settings: dict | None = None,
    on_progress: StageProgress | None = None,
    written_as: str = "pixels",
) -> EvaluationResult:
    """Run the protocol of the module docstring.

    Args:
        data: folder with one sub-folder of photos per person.
        protection: the protection under test (`facecloak.protection.CloakFaces`, ...); None
            leaves the photos unprotected (the baseline) or, with ``protected_dir``, reads them.
        attackers: the scrapers to measure.
        detector: finds the faces to protect (default: a `FaceDetector` with default settings).
        protected_dir: photos protected elsewhere, ``protected_dir/<person>/<photo stem>...``.
        method: name of the protection, for the report (default: from ``protection``).
        people: how many people to protect (or their names).
        control: unprotected people measured alongside (the control).
        min_photos: protected and control people have at least this many photos.
        probes: clean photos held out per person.
        uploads: upload transforms, one row each (see `facecloak.evaluate.uploads.UPLOADS`).
        adaptive: also run the adaptive attacker, protecting ``adaptive_people`` further people's
            photos to learn from: "linear" (a learnt map of embeddings), "finetune" (the model's
            last block fine-tuned; facecloak's own pipelines only) or "both". None: not run.
        adaptive_people: how many further people the adaptive attacker learns from.
        max_distractors: use at most this many distractor photos (drawn with ``seed``); None: all.
        seed: seed of the draw of people.
        cache: cache of clean embeddings (distractors and probes).
        settings: extra settings to record.
        on_progress: called with (stage, done, total).
        written_as: "pixels": a cloak's photos as cloaked (a PNG output); "jpeg": held to their
            caps in the JPEG the command line writes from each photo, which the uploads then see.
    """
    if not uploads:  # `--uploads ""` gave a report without a single row, and exit code 0
        raise InvalidInputError(f"no upload transform to measure: give one or more of {', '.join(UPLOADS)}")
    for upload in uploads:
        check_choice(upload, tuple(UPLOADS), "upload")
    if adaptive is not None:
        check_choice(adaptive, ADAPTIVE_KINDS, "adaptive")
    started = time.perf_counter()
    progress = on_progress or (lambda stage, done, total: None)
    cache = cache or EmbeddingCache(None)
    if detector is None and protection is not None and protected_dir is None:
        detector = FaceDetector(rotations=SCRAPER_ROTATIONS)
    protector = PersonProtector(
        protection, detector, attackers, protected_dir=protected_dir, written_as=written_as
    )
    everyone = list_people(data)
    try:
        split = split_people(
            everyone, protected=people, control=control, min_photos=min_photos, probes=probes, seed=seed
        )
    except InvalidInputError as error:  # the folder that falls short, named in the one line
        raise InvalidInputError(error.reason, error.path or data) from None
    if adaptive is not None:
        pool = _adaptive_pool(everyone, split, protected_dir)
        if not pool:  # fit_correction on no pairs: a traceback (a singular matrix), after the protect phase
            where = "" if protected_dir is None else f" and protected photos in {shown_path(protected_dir)}"
            raise InvalidInputError(
                f"--adaptive learns from people outside the test with >= {ADAPTIVE_MIN_PHOTOS} "
                f"photos{where}, and there are none here",
                data,
            )
        adaptive_people = min(adaptive_people, len(pool))  # the report said how many were asked for
    labels = {person.name: index for index, person in enumerate(everyone)}
    distractor_pairs = _draw_distractors(split, labels, max_distractors, seed)
    if len(split.protected) + len(split.control) + len({label for _, label in distractor_pairs}) < 2:
        # a gallery of one person's photos: the nearest match is that person whatever was done
        # (a working cloak reported protection 0.00, a blur 1.00, both without meaning)
        raise InvalidInputError(
            f"the gallery would hold {split.protected[0].name}'s photos alone, so a scraper's nearest "
            "match is always that person: measure with --control people or distractor photos",
            data,
        )
    learnt_from = (
        [] if adaptive is None else _adaptive_people(everyone, split, adaptive_people, seed, protected_dir)
    )
    # every photo the run reads, decoded (a JPEG at an eighth of its size: about 0.3 ms for an LFW
    # photo): a broken one fails now, in one line, not at the scoring after a protect phase of
    # minutes or hours (the adaptive scraper's photos too: with --max-distractors they need not be
    # in the gallery, and were read only then). Headers alone passed a photo cut short.
    for path in (
        [*(p for person in (*split.protected, *split.control) for p in person.photos)]
        + [path for path, _ in distractor_pairs]
        + [path for person in learnt_from for path in person.photos[:ADAPTIVE_PHOTOS_PER_PERSON]]
    ):
        io.probe_image(path, decode=True)
    result = EvaluationResult(
        settings={
            "data": str(data),
            "method": method or _method_name(protection, protected_dir),
            "protected_people": [p.name for p in split.protected],
            "control_people": len(split.control),
            "distractor_people": len({label for _, label in distractor_pairs}),
            "distractor_photos": len(distractor_pairs),
            "max_distractors": max_distractors,
            "min_photos": min_photos,
            "probes": probes,
            "uploads": list(uploads),
            "upload_transforms": {upload: UPLOAD_DESCRIPTIONS[upload] for upload in uploads},
            "attackers": [a.name for a in attackers],
            "adaptive_people": adaptive_people if adaptive is not None else 0,
            "seed": seed,
            "versions": _versions(),
            **(settings or {}),
        }
    )

    gallery = _protect_phase(split, protector, labels, progress)
    result.quality = quality_summary(gallery.clean.images, gallery.protected.images, gallery.records)
    result.examples = examples(gallery.clean, gallery.protected, everyone, count=EXAMPLES)
    collected = _collect_phase(
        everyone, split, labels, protector if adaptive is not None else None, adaptive_people,
        distractor_pairs, seed, progress, protected_dir,
    )  # fmt: skip
    embed_seconds, embedded = 0.0, 0
    rate_by_attacker: dict[str, float] = {}
    for a, attacker in enumerate(attackers):
        seconds, count = _score_phase(
            result, attacker, gallery, collected, uploads, adaptive, cache, seed, progress
        )
        embed_seconds += seconds
        embedded += count
        rate_by_attacker[attacker.name] = round(count / max(seconds, 1e-9), 2)
        cache.save()
        progress("attackers", a + 1, len(attackers))
    protected_photos = len(gallery.protected.images)
    result.timings = {
        "total_seconds": round(time.perf_counter() - started, 2),
        "protect_seconds": round(gallery.seconds, 2),
        "protected_photos": protected_photos,
        "protect_seconds_per_photo": round(gallery.seconds / max(1, protected_photos), 3),
        "embedded_photos": embedded,
        "embed_photos_per_second": round(embedded / max(embed_seconds, 1e-9), 2),
        "embed_photos_per_second_by_attacker": rate_by_attacker,
    }
    return result


def _method_name(protection: Protection | None, protected_dir: Path | None) -> str:
    """The report's name: "none", "cloak", "replace", the anonymiser's method or "folder:<dir>"."""
    if protected_dir is not None:
        return f"folder:{protected_dir}"
    if protection is None:
        return "none"
    return protection.tag if protection.kind == "anonymize" else protection.kind


# -- phase 1: protect ---------------------------------------------------------------------------


def _protect_phase(
    split: Split, protector: PersonProtector, labels: dict[str, int], progress: StageProgress
) -> _Protected:
    """Protect each protected person's gallery photos."""
    clean, protected, records = Photos(), Photos(), []
    started = time.perf_counter()
    for done, person in enumerate(split.protected):
        paths = list(split.gallery_photos(person))
        photos = [io.read_image(path).pixels for path in paths]
        outputs, person_records = protector(photos, paths, person.name)
        for path, photo, output, record in zip(paths, photos, outputs, person_records):
            clean.add(photo, labels[person.name], path)
            protected.add(output, labels[person.name], path)
            records.append(record)
        progress("protect", done + 1, len(split.protected))
    return _Protected(clean, protected, records, time.perf_counter() - started)


# -- phase 2: collect ---------------------------------------------------------------------------


def _draw_distractors(
    split: Split, labels: dict[str, int], max_distractors: int | None, seed: int
) -> list[tuple[Path, int]]:
    """(photo, label) of the distractor photos in the gallery: all, or ``max_distractors`` drawn.

    Drawn with ``seed`` before the report's settings, which count the people these photos show.
    """
    pairs = [(path, labels[p.name]) for p in split.distractors for path in p.photos]
    if max_distractors is not None and max_distractors < len(pairs):
        order = np.random.default_rng(seed).permutation(len(pairs))[:max_distractors]
        pairs = [pairs[i] for i in sorted(order)]
    return pairs


def _collect_phase(
    everyone: list[Person],
    split: Split,
    labels: dict[str, int],
    adaptive_protector: PersonProtector | None,
    adaptive_people: int,
    distractor_pairs: list[tuple[Path, int]],
    seed: int,
    progress: StageProgress,
    protected_dir: Path | None = None,
) -> _Collected:
    """The control's gallery photos, everyone's probes, the distractors and the adaptive training pairs."""
    control = Photos()
    for person in split.control:
        for path in split.gallery_photos(person):
            control.add(io.read_image(path).pixels, labels[person.name], path)
    probe_people = list(split.protected) + list(split.control)
    probe_paths = [path for person in probe_people for path in split.probe_photos(person)]
    probe_labels = torch.tensor([labels[p.name] for p in probe_people for _ in split.probe_photos(p)])
    is_protected_probe = torch.tensor(
        [i < len(split.protected) for i, p in enumerate(probe_people) for _ in split.probe_photos(p)]
    )
    adaptive_pairs = None
    if adaptive_protector is not None:
        adaptive_pairs = _adaptive_training(
            everyone, split, adaptive_protector, adaptive_people, seed, progress, protected_dir
        )
    return _Collected(
        control=control,
        probe_paths=probe_paths,
        probe_labels=probe_labels,
        is_protected_probe=is_protected_probe,
        distractor_paths=[path for path, _ in distractor_pairs],
        distractor_labels=torch.tensor([label for _, label in distractor_pairs], dtype=torch.long),
        adaptive_pairs=adaptive_pairs,
    )


def _adaptive_pool(everyone: list[Person], split: Split, protected_dir: Path | None = None) -> list[Person]:
    """The people the adaptive attacker may learn from: outside the test, with enough photos.

    With photos protected elsewhere, only people whose protected photos that folder holds: a
    folder of the test's people alone failed with "no protected version" of a person never asked for.
    """
    used = {p.name for p in split.protected} | {p.name for p in split.control}
    return [
        p
        for p in everyone
        if p.name not in used
        and len(p.photos) >= ADAPTIVE_MIN_PHOTOS
        and (protected_dir is None or (protected_dir / p.name).is_dir())
    ]


def _adaptive_people(
    everyone: list[Person], split: Split, count: int, seed: int, protected_dir: Path | None = None
) -> list[Person]:
    """The ``count`` people of the pool the adaptive attacker learns from, drawn with ``seed``."""
    pool = _adaptive_pool(everyone, split, protected_dir)
    rng = np.random.default_rng(seed + 1)
    return [pool[i] for i in rng.permutation(len(pool))[:count]]


def _adaptive_training(
    everyone: list[Person],
    split: Split,
    protector: PersonProtector,
    count: int,
    seed: int,
    progress: StageProgress,
    protected_dir: Path | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Protect photos of people outside the test; return (protected, clean) image lists to learn from."""
    chosen = _adaptive_people(everyone, split, count, seed, protected_dir)
    protected_images, clean_images = [], []
    for done, person in enumerate(chosen):
        paths = list(person.photos[:ADAPTIVE_PHOTOS_PER_PERSON])
        photos = [io.read_image(path).pixels for path in paths]
        outputs, _ = protector(photos, paths, person.name)
        uploaded = [UPLOADS[ADAPTIVE_UPLOAD](output) for output in outputs]
        protected_images += uploaded + photos  # protected -> clean, and clean -> clean (keep clean intact)
        clean_images += photos + photos
        progress("adaptive training", done + 1, len(chosen))
    return protected_images, clean_images


# -- phase 3: score -----------------------------------------------------------------------------


def _score_phase(
    result: EvaluationResult,
    attacker: Attacker,
    gallery: _Protected,
    collected: _Collected,
    uploads: Sequence[str],
    adaptive: str | None,
    cache: EmbeddingCache,
    seed: int,
    progress: StageProgress,
) -> tuple[float, int]:
    """One attacker's rows (per upload, plain and adaptive) and distances; returns (embed seconds, photos)."""
    clean, protected, control = gallery.clean, gallery.protected, collected.control
    files = collected.probe_paths + collected.distractor_paths
    fingerprint = attacker.fingerprint
    fresh = sum(cache.get(fingerprint, path) is None for path in files)  # not from the cache
    tick = time.perf_counter()
    probes = embed_files(
        attacker, collected.probe_paths, cache, _stage(progress, f"probes ({attacker.name})")
    )
    if len(probes) and bool(torch.isnan(probes).any(1).all()):
        # every probe a miss: protection 1.00 and exit code 0, for photos with no face to protect
        raise InvalidInputError(
            f"{attacker.name} found no face in any of the {len(probes)} probe photos "
            f"(the first: {shown_path(collected.probe_paths[0])}): "
            "there is nothing to identify, so nothing to measure"
        )
    distractors = embed_files(
        attacker, collected.distractor_paths, cache, _stage(progress, f"distractors ({attacker.name})")
    )
    clean_embeddings = embed_in_batches(attacker, clean.images)
    embed_seconds = time.perf_counter() - tick
    embedded = fresh + len(clean.images)  # the photos the time was spent on: cached ones took none
    result.distances[attacker.name] = distance_summary(
        attacker, clean_embeddings, probes, collected.probe_labels, clean.labels, distractors
    )
    pairs = collected.adaptive_pairs
    correction, tuned = None, None
    if pairs is not None and adaptive in ("linear", "both"):
        source, target = (embed_in_batches(attacker, images) for images in pairs)
        keep = ~(torch.isnan(source).any(1) | torch.isnan(target).any(1))
        if not keep.any():  # fit_correction on no pair: a singular-matrix traceback
            raise InvalidInputError(_nothing_to_learn(attacker, result))
        correction = fit_correction(source[keep], target[keep])
        result.settings.setdefault("linear", {})[attacker.name] = {
            "pairs": int(keep.sum()),
            "protected_pairs": int((keep & protected_pairs_mask(*pairs)).sum()),
        }
    if pairs is not None and adaptive in ("finetune", "both") and not isinstance(attacker, PipelineAttacker):
        # said, not passed over without a word: its rows simply had no fine-tuned variant
        result.settings.setdefault("finetune", {})[attacker.name] = (
            "not fine-tuned: a fixed pipeline with no weights to train here (dlib's own C++ one)"
        )
    if pairs is not None and adaptive in ("finetune", "both") and isinstance(attacker, PipelineAttacker):
        model = finetune_model(attacker.model, *pairs, attacker.detector, seed=seed)
        if not model.adaptive_pairs:  # untrained, its rows were the plain model's, reported as fine-tuned
            raise InvalidInputError(_nothing_to_learn(attacker, result))
        tick = time.perf_counter()  # the rates are of embedding: the training is not timed
        tuned = PipelineAttacker(model, attacker.detector)
        tuned_probes = embed_in_batches(tuned, [io.read_image(path).pixels for path in collected.probe_paths])
        tuned_distractors = embed_files(
            tuned, collected.distractor_paths, EmbeddingCache(None), lambda d, t: None
        )
        result.settings.setdefault("finetune", {})[attacker.name] = finetune_summary(model)
        embed_seconds += time.perf_counter() - tick
        embedded += len(files)
    gallery_ids = torch.cat(
        [torch.tensor(protected.labels), torch.tensor(control.labels), collected.distractor_labels]
    )
    for u, upload in enumerate(uploads):
        tick = time.perf_counter()
        gallery_protected = embed_in_batches(attacker, [UPLOADS[upload](image) for image in protected.images])
        gallery_control = embed_in_batches(attacker, [UPLOADS[upload](image) for image in control.images])
        embed_seconds += time.perf_counter() - tick
        embedded += len(protected.images) + len(control.images)
        everything = torch.cat([gallery_protected, gallery_control, distractors])
        if u == 0:
            add_protected_distances(result, attacker, clean_embeddings, gallery_protected, upload)
        variants = [(False, everything, probes)]
        if correction is not None:
            variants.append(
                ("linear", apply_correction(everything, correction), apply_correction(probes, correction))
            )
        if tuned is not None:
            tick = time.perf_counter()
            tuned_gallery = torch.cat(
                [
                    embed_in_batches(tuned, [UPLOADS[upload](image) for image in protected.images]),
                    embed_in_batches(tuned, [UPLOADS[upload](image) for image in control.images]),
                    tuned_distractors,
                ]
            )
            embed_seconds += time.perf_counter() - tick
            embedded += len(protected.images) + len(control.images)
            variants.append(("finetune", tuned_gallery, tuned_probes))
        for variant, gallery_used, probes_used in variants:
            result.rows.append(
                score_row(
                    attacker,
                    upload,
                    variant,
                    gallery_used,
                    gallery_ids,
                    probes_used,
                    collected.probe_labels,
                    collected.is_protected_probe,
                    gallery_protected,
                )
            )
        progress(f"uploads ({attacker.name})", u + 1, len(uploads))
    return embed_seconds, embedded


def _nothing_to_learn(attacker: Attacker, result: EvaluationResult) -> str:
    """Why an adaptive scraper cannot be measured: its attacker found no face in any photo to learn from."""
    return (
        f"{attacker.name} found no face in any photo of the {result.settings['adaptive_people']} "
        "people outside the test the adaptive scraper learns from: there is nothing to learn from"
    )


def _stage(progress: StageProgress, stage: str) -> Callable[[int, int], None]:
    """A (done, total) callback reporting under ``stage``."""
    return lambda done, total: progress(stage, done, total)


def _versions() -> dict:
    from facecloak import __version__

    return {"facecloak": __version__, "torch": torch.__version__, "numpy": np.__version__}
