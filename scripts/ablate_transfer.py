"""Ablation of the cloak's transfer methods: leave-one-out over the surrogate models, after JPEG 75.

For every configuration (a row) and every model left out in turn, the cloak attacks the other
models and `facecloak.evaluate.evaluate` measures the left-out one: protection (1 - rank-1 of
the protected people's clean probes against a gallery of their cloaked, JPEG-75 re-encoded
photos plus controls and distractors), the cloak's displacement on the left-out model (distance
of each cloaked photo to its own clean version, in thresholds), and the visibility (face-region
DSSIM, CIEDE2000 mean and 99th percentile).

To keep it affordable on a CPU, each protected person contributes ``--gallery`` photos (their
folder is narrowed in a temporary tree of links); the embeddings of clean photos are cached.
``--set NAME=VALUE`` overrides a constant of `facecloak.cloak.base` for the run (e.g.
``--set FILL_BUDGET=0``: no final enlargement of the change up to the DSSIM cap).

    python scripts/ablate_transfer.py --models dlib-resnet,mobileface,hse-mobilenet \\
        --configs legacy,jnd,jnd+di+ti --people 6 --gallery 4 --out reports/ablation.json

``--seed 0,1,2`` draws three sets of protected people, runs each in turn, and adds a table pooled
over them (protection over every draw's probes): one draw of 12 people can land 0.15 from another.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from _bench import set_cloak_constants
from facecloak.cloak import create_cloak
from facecloak.cloak.base import (
    DEFAULT_AVERAGE_ITERATES,
    DEFAULT_DIVERSITY,
    DEFAULT_SMOOTHING,
    DEFAULT_SPEND_BUDGET,
)
from facecloak.cloak.budget import LEGACY_LEVELS, LEVELS
from facecloak.datasets import list_people
from facecloak.defaults import SCRAPER_ROTATIONS
from facecloak.detect import FaceDetector
from facecloak.evaluate import EmbeddingCache, PipelineAttacker, evaluate
from facecloak.models import create_embedder
from facecloak.protection import CloakFaces

DEFAULT = {
    "diversity": DEFAULT_DIVERSITY,
    "smoothing": DEFAULT_SMOOTHING,
    "spend_budget": DEFAULT_SPEND_BUDGET,
    "average_iterates": DEFAULT_AVERAGE_ITERATES,
}
"""The cloak's transfer defaults, read from `facecloak.cloak.base` so that a ``default+...`` row
follows them when they change: the base of every such row."""
NO_BOOSTERS = {"diversity": 0.0, "smoothing": 0.0, "spend_budget": False, "average_iterates": False}
"""The perceptual budget alone: the base of every ``jnd...`` row. The cloak's defaults turn every
booster on, so a row that named only what it adds would carry the others too."""
CONFIGS = {
    "legacy": {"budget": "legacy"},
    "jnd": NO_BOOSTERS,
    "jnd+di": {**NO_BOOSTERS, "diversity": 0.7},
    "jnd+ti": {**NO_BOOSTERS, "smoothing": 1.0},
    "jnd+mi": {**NO_BOOSTERS, "update": "momentum"},
    "jnd+spend": {**NO_BOOSTERS, "spend_budget": True},
    "jnd+di+ti": {**NO_BOOSTERS, "diversity": 0.7, "smoothing": 1.0},
    "jnd+di+ti+spend": {**NO_BOOSTERS, "diversity": 0.7, "smoothing": 1.0, "spend_budget": True},
    "jnd2.4+di+ti": {**NO_BOOSTERS, "jnd_scale": 2.4, "diversity": 0.7, "smoothing": 1.0},
    "jnd2.4": {**NO_BOOSTERS, "jnd_scale": 2.4},
    "jnd+di+ti3+spend": {**NO_BOOSTERS, "diversity": 0.7, "smoothing": 3.0, "spend_budget": True},
    "jnd2.4+di+ti3+spend": {
        **NO_BOOSTERS,
        "jnd_scale": 2.4,
        "diversity": 0.7,
        "smoothing": 3.0,
        "spend_budget": True,
    },
    "default+steps80": {**DEFAULT, "steps": 80},
    "default+chroma0.25": {**DEFAULT, "chroma_share": 0.25},
    "default+chroma0.4": {**DEFAULT, "chroma_share": 0.4},
    "default+steps20": {**DEFAULT, "steps": 20},
    "default+chroma0.25+steps20": {**DEFAULT, "chroma_share": 0.25, "steps": 20},
    "default+drop0.1": {**DEFAULT, "dropout": 0.1},
    "default+drop0.03": {**DEFAULT, "dropout": 0.03},
    "default+sgm0.5": {**DEFAULT, "skip_gradient": 0.5},
    "default+sgm0.2": {**DEFAULT, "skip_gradient": 0.2},
    "default+opom": {**DEFAULT, "person_level": True},
    "jnd+opom": {**NO_BOOSTERS, "person_level": True},
    "jnd+spend+opom": {**NO_BOOSTERS, "spend_budget": True, "person_level": True},
    "default+opom+region": {**DEFAULT, "person_level": True, "measured_on": "region"},
    "default+opom+lag0": {**DEFAULT, "person_level": True, "laggard_weight": 0.0},
    "default+opom+noavg": {**DEFAULT, "person_level": True, "average_iterates": False},
    "default+opom+chroma0.1": {**DEFAULT, "person_level": True, "chroma_share": 0.1, "max_ciede": None},
    "default+opom+chroma0.3": {**DEFAULT, "person_level": True, "chroma_share": 0.3},
    "default+opom+steps60": {**DEFAULT, "person_level": True, "steps": 60},
    "default+opom+extra0": {**DEFAULT, "person_level": True, "extra_steps": 0},
    "default+opom+eot2": {**DEFAULT, "person_level": True, "eot_samples": 2},
    "default+opom+eot4": {**DEFAULT, "person_level": True, "eot_samples": 4},
    "default+opom+region1.7": {**DEFAULT, "person_level": True, "region_scale": 1.7},
    "default+opom+region2": {**DEFAULT, "person_level": True, "region_scale": 2.0},
    "default+feat1": {**DEFAULT, "feature_weight": 1.0},
    "default+feat3": {**DEFAULT, "feature_weight": 3.0},
    "default+feat1@0.3": {**DEFAULT, "feature_weight": 1.0, "feature_depth": 0.3},
}
BUDGET_FIELDS = ("jnd_scale", "chroma_share", "max_dssim", "max_ciede", "extra_steps")
"""Configuration keys that change the level's budget rather than the cloak's options."""
"""Named configurations: keyword arguments to `create_cloak` on top of the level's budget."""


def narrowed_tree(data: Path, root: Path, names: list[str], keep: int) -> None:
    """Links to every person's folder, except ``names``, whose folders keep their first ``keep`` photos."""
    for person in list_people(data):
        target = root / person.name
        if person.name in names:
            target.mkdir()
            for photo in person.photos[:keep]:
                (target / photo.name).symlink_to(photo.resolve())
        else:
            target.symlink_to(person.photos[0].parent.resolve())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/data/lfw/images")
    parser.add_argument("--models", default="dlib-resnet,mobileface,hse-mobilenet")
    parser.add_argument("--configs", default="legacy,jnd,jnd+di+ti,jnd+di+ti+spend")
    parser.add_argument(
        "--written-as",
        choices=["pixels", "jpeg"],
        default="pixels",
        help="pixels: the cloaked photos as cloaked (PNG); jpeg: held to the caps in the JPEG "
        "the command line writes from each LFW photo, which the upload then re-encodes",
    )
    parser.add_argument("--level", default="mid")
    parser.add_argument("--left-out", default=None, help="leave out only these models (comma-separated)")
    parser.add_argument(
        "--cloak-with",
        default=None,
        help="instead of leave-one-out: cloak with these models only, measure each of the others",
    )
    parser.add_argument("--people", type=int, default=6)
    parser.add_argument("--gallery", type=int, default=4, help="cloaked photos per protected person")
    parser.add_argument("--probes", type=int, default=2)
    parser.add_argument("--control", type=int, default=10)
    parser.add_argument("--distractors", type=int, default=1500)
    parser.add_argument(
        "--seed", default="0", help="draw of protected people; several (0,1,2): each in turn, then pooled"
    )
    parser.add_argument("--cache", default=".cache/ablation")
    parser.add_argument("--out", default="reports/ablation.json")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a cloak constant"
    )
    args = parser.parse_args()
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:  # before minutes of model loading and embedding, not a KeyError after them
        parser.error(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    set_cloak_constants(args.set, parser)

    names = [n.strip() for n in args.models.split(",")]
    models = [create_embedder(name) for name in names]
    detector = FaceDetector(rotations=SCRAPER_ROTATIONS)  # LFW is upright
    cache = EmbeddingCache(Path(args.cache))
    eligible = [p.name for p in list_people(args.data) if len(p.photos) >= 10]
    seeds = [int(s) for s in str(args.seed).split(",")]
    rows: list[dict] = []
    people: dict[int, list[str]] = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        people[seed] = sorted(random.Random(seed).sample(eligible, args.people))
        for record in seed_rows(args, seed, people[seed], names, models, detector, cache):
            rows.append(record)
            print(json.dumps(record), flush=True)
            out.write_text(json.dumps({"settings": vars(args), "people": people, "rows": rows}, indent=2))
    columns = (
        "config",
        "seed",
        "left out",
        "protection",
        "displacement / thr",
        "face DSSIM",
        "CIEDE2000 mean",
        "p99",
    )
    print("\n| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['seed']} | {r['left_out']} | {r['protection']:.2f} "
            f"| {r['displacement_over_threshold']:.2f} | {r['face_dssim']:.4f} "
            f"| {r['ciede2000_mean']:.2f} | {r['ciede2000_p99']:.2f} |"
        )
    if len(seeds) > 1:
        print(f"\npooled over seeds {args.seed} ({len(seeds) * args.people} people drawn):")
        print("| config | left out | protection (probes) | displacement / thr, mean of the seeds |")
        print("|---|---|---|---|")
        for key, group in pooled(rows).items():
            counts = f"{group['protected']} of {group['probes']}"
            protection, displacement = f"{group['protection']:.2f}", f"{group['displacement']:.2f}"
            print(f"| {key[0]} | {key[1]} | {protection} ({counts}) | {displacement} |")
    return 0


def pooled(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (config, left-out model): protection over every seed's probes, and the seeds' mean displacement."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["left_out"]), []).append(r)
    summary = {}
    for key, group in groups.items():
        probes = sum(r["protected_probes"] for r in group)
        protected = round(sum(r["protection"] * r["protected_probes"] for r in group))
        summary[key] = {
            "protection": protected / probes if probes else math.nan,
            "protected": protected,
            "probes": probes,
            "displacement": statistics.mean(r["displacement_over_threshold"] for r in group),
        }
    return summary


def seed_rows(args, seed: int, chosen: list[str], names: list[str], models, detector, cache):
    """The rows of one draw of protected people (``seed``): every configuration and left-out model."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        narrowed_tree(Path(args.data), root, chosen, args.probes + args.gallery)
        for config in args.configs.split(","):
            options = {"person_level": False, **CONFIGS[config]}  # rows are per photo unless named
            if options.pop("budget", None) == "legacy":
                options["budget"] = LEGACY_LEVELS[args.level]
            changes = {key: options.pop(key) for key in BUDGET_FIELDS if key in options}
            if changes:
                options["budget"] = replace(LEVELS[args.level], **changes)
            if args.cloak_with:
                surrogates = args.cloak_with.split(",")
                plan = [
                    (
                        [m for m in models if m.card.name in surrogates],
                        [m for m in models if m.card.name not in surrogates],
                    )
                ]
            else:
                leave = args.left_out.split(",") if args.left_out else names
                plan = [
                    ([m for m in models if m is not left_out], [left_out])
                    for left_out in models
                    if left_out.card.name in leave
                ]
            for kept, unseen in plan:
                cloak = create_cloak("untargeted", kept, args.level, detector=detector, seed=seed, **options)
                started = time.perf_counter()
                result = evaluate(
                    root,
                    CloakFaces(cloak),
                    [PipelineAttacker(model, detector) for model in unseen],
                    detector=detector,
                    people=chosen,
                    control=args.control,
                    min_photos=10,
                    probes=args.probes,
                    uploads=("jpeg75",),
                    max_distractors=args.distractors,
                    seed=seed,
                    cache=cache,
                    written_as=args.written_as,
                )
                seconds = round(time.perf_counter() - started, 1)
                q = result.quality
                for row, left_out in zip(result.rows, unseen):
                    displacement = result.distances[left_out.card.name].get("protected_vs_own_clean", [])
                    yield {
                        "config": config,
                        "seed": seed,
                        "left_out": left_out.card.name,
                        "cloaked_with": ",".join(m.card.name for m in kept),
                        "protection": row.protection,
                        "protected_probes": row.protected_probes,
                        "control_rank1": row.control_rank1,
                        "displacement_over_threshold": statistics.mean(displacement)
                        / left_out.card.match_threshold
                        if displacement
                        else math.nan,
                        "face_dssim": q.get("face_dssim", {}).get("mean", math.nan),
                        "ciede2000_mean": q.get("face_ciede2000_mean", {}).get("mean", math.nan),
                        "ciede2000_p99": q.get("face_ciede2000_p99", {}).get("mean", math.nan),
                        "faces": q.get("cloak_faces", 0),
                        "faces_protected_on_surrogates": q.get("cloak_faces_protected", 0),
                        "steps_mean": q.get("cloak_steps_mean", math.nan),
                        "seconds": seconds,
                    }


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
