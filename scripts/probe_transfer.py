"""Quick transfer probe: how far a cloak moves faces on every registered model, after JPEG 75.

The leave-one-out ablation (`scripts/ablate_transfer.py`) runs the whole evaluator and takes
minutes per row. This probe answers the narrower question an experiment asks first, in about
half a minute on 2 CPU cores: cloak the central face of ``--photos`` LFW photos with the models
in ``--cloak-with``, re-encode the result as JPEG 75, and report each model's displacement (the
distance of every cloaked face to its own clean embedding, in thresholds; above 1 a scraper no
longer links the two) beside the visibility (face DSSIM, CIEDE2000 mean and 99th percentile).
Models not in ``--cloak-with`` are the unseen ones; ``faces_past_every_attacked_model`` counts the
faces past the threshold of every model attacked (what the cloak's check calls protected).

    python scripts/probe_transfer.py --options '{"eot_samples": 2}'
    python scripts/probe_transfer.py --set DSSIM_PENALTY=10 --out bench-results/probe.json
    python scripts/probe_transfer.py --upscale 4 --set WORKING_FACE_PX=1e6   # large faces, native

``--written-as jpeg`` holds the caps on the JPEG the command line would write from each LFW JPEG
(block by block with its own tables, `facecloak.io.stored_as`) and uploads that: what a user who
keeps JPEG outputs gets; ``jpeg95`` on a whole re-encode at quality 95 (``--jpeg-quality 95``).

``--upscale N`` enlarges every photo N times (bicubic, rounded to 8 bits) before the cloak: faces
of 360-420 px, which the cloak works on at a working scale (`facecloak.cloak.scale`);
``working_factor`` reports the mean factor.

``--options`` are keyword arguments to `facecloak.cloak.create_cloak` (budget fields such as
``jnd_scale``, ``chroma_share``, ``steps`` or ``step_size`` change the level's budget);
``--set NAME=VALUE`` overrides a numeric constant of `facecloak.cloak.base` for this run (the
DSSIM penalty's weight and onset, the DSSIM safety margin, how often the hard cap is checked,
whether the final change is enlarged up to the cap: `_bench.CLOAK_CONSTANTS`).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from _bench import data_root, machine, set_cloak_constants, write_json
from facecloak.cloak import create_cloak
from facecloak.cloak.budget import LEVELS, CloakBudget
from facecloak.defaults import SCRAPER_ROTATIONS
from facecloak.detect import FaceDetector
from facecloak.embed import embed_faces
from facecloak.evaluate import centre_face
from facecloak.faces import Faces
from facecloak.io import read_image, stored_as
from facecloak.io.write import jpeg_roundtrip
from facecloak.models import available_embedders, create_embedder
from facecloak.quality import box_dssim
from facecloak.transforms import levels_8bit


def central_faces(images: list[torch.Tensor], faces: Faces) -> Faces:
    """The face nearest each photo's centre (LFW's subject), one per photo that has any."""
    keep = []
    for i, image in enumerate(images):
        rows = (faces.image_index == i).nonzero()[:, 0]
        if len(rows):
            keep.append(int(rows[centre_face(faces.select(rows), image.shape[-1], image.shape[-2])]))
    return faces.select(torch.tensor(keep, dtype=torch.long))


def detection_box_dssim(images: list[torch.Tensor], cloaked: list[torch.Tensor], faces: Faces) -> float:
    """Mean DSSIM over each face's detection box as stored, whatever box the cloak's caps held on."""
    values = []
    for k in range(len(faces)):
        i = int(faces.image_index[k])
        height, width = images[i].shape[-2:]
        x0, y0, x1, y1 = faces.boxes[k].tolist()
        box = torch.tensor(
            [[max(0, int(x0)), max(0, int(y0)), min(width, int(x1) + 1), min(height, int(y1) + 1)]]
        )
        stored = levels_8bit(cloaked[i]).float()[None] / 255
        values.append(float(box_dssim(images[i][None], stored, box)[0]))
    return sum(values) / max(1, len(values))


def upscaled(image: torch.Tensor, factor: int) -> torch.Tensor:
    """``image`` enlarged ``factor`` times (bicubic), rounded to 8 bits as a decoded photo is."""
    if factor == 1:
        return image
    large = F.interpolate(image[None], scale_factor=factor, mode="bicubic", align_corners=False)[0]
    return levels_8bit(large.clamp(0, 1)).float() / 255


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--cloak-with", default="dlib-resnet,mobileface")
    parser.add_argument("--level", default="mid")
    parser.add_argument("--options", default="{}", help="JSON keyword arguments to create_cloak")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--seed", type=int, default=1, help="which LFW photos (shuffle seed)")
    parser.add_argument("--upscale", type=int, default=1, help="enlarge the photos this many times")
    parser.add_argument(
        "--written-as",
        choices=["pixels", "jpeg", "jpeg95"],
        default="pixels",
        help="pixels: the cap on the 8-bit photo (a PNG output); jpeg: on the JPEG the CLI writes "
        "from each LFW JPEG (block by block with its own tables); jpeg95: on a whole re-encode at 95",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    set_cloak_constants(args.set, parser)
    options = json.loads(args.options)
    budget_keys = {f.name for f in fields(CloakBudget)}
    changes = {key: options.pop(key) for key in list(options) if key in budget_keys}
    surrogates = args.cloak_with.split(",")
    models = {name: create_embedder(name) for name in available_embedders()}
    missing = [name for name in surrogates if name not in models]
    if missing:
        parser.error(f"--cloak-with: not registered: {', '.join(missing)}")

    files = sorted((data_root() / "lfw" / "images").glob("*/*.jpg"))
    random.Random(args.seed).shuffle(files)
    loaded = [read_image(path) for path in files[: args.photos]]
    images = [upscaled(image.pixels, args.upscale) for image in loaded]
    if args.written_as != "pixels" and args.upscale != 1:
        parser.error("--written-as jpeg needs the photos as read (--upscale 1)")
    quality = 95 if args.written_as == "jpeg95" else None  # a whole re-encode, or the input's own blocks
    storage = (
        None if args.written_as == "pixels" else [stored_as("out.jpg", image, quality) for image in loaded]
    )
    detector = FaceDetector(rotations=SCRAPER_ROTATIONS)  # LFW is upright
    faces = central_faces(images, detector(images))
    cloak = create_cloak(
        "untargeted",
        [models[name] for name in surrogates],
        args.level,
        budget=replace(LEVELS[args.level], **changes),
        detector=detector,
        verify=False,
        seed=0,
        **options,
    )
    started = time.perf_counter()
    result = cloak(images, faces, stored_as=storage)
    seconds = time.perf_counter() - started
    uploaded = [jpeg_roundtrip(image, 75) for image in result.images]
    row: dict = {
        "cloak_with": surrogates,
        "level": args.level,
        "options": json.loads(args.options),
        "set": args.set,
        "faces": len(faces),
        "upscale": args.upscale,
        "written_as": args.written_as,
        "working_factor": round(float(result.working_factors.mean()), 3),
        "seconds_per_face": round(seconds / max(1, len(faces)), 2),
        "face_dssim": round(float(result.dssim.mean()), 4),
        "detection_box_dssim": round(detection_box_dssim(images, result.images, faces), 4),
        "ciede2000_mean": round(float(result.ciede_mean.mean()), 2),
        "ciede2000_p99": round(float(result.ciede_p99.mean()), 2),
        "displacement_over_threshold": {},
        "faces_past_threshold": {},
    }
    past_every_attacked = torch.ones(len(faces), dtype=torch.bool)
    for name, model in models.items():
        ratio = model.distance(embed_faces(uploaded, faces, model), embed_faces(images, faces, model))
        ratio = (ratio / model.card.match_threshold).cpu()
        row["displacement_over_threshold"][name] = round(float(ratio.mean()), 3)
        row["faces_past_threshold"][name] = int((ratio >= 1).sum())
        if name in surrogates:
            past_every_attacked &= ratio >= 1
    # what the cloak's own check calls protected (it re-detects the faces; this keeps the boxes)
    row["faces_past_every_attacked_model"] = int(past_every_attacked.sum())
    print(json.dumps(row), flush=True)
    if args.out:
        write_json(Path(args.out), {"machine": machine(), "rows": [row]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
