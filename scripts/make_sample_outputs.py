"""Regenerate the before/after images of the README (samples/outputs/), deterministically.

    python scripts/make_sample_outputs.py [--models NAMES] [--only replace|cloak] [--donors BANK]

For each mode: the protected photo, and for cloaks a difference image |cloaked - original| x 10
and a side-by-side strip (original | cloaked | difference) of the face, and one lossless PNG per
photo with the face at 2x zoom: original | low | mid | high (``*_levels_2x.png``), to judge by eye.

    python scripts/make_sample_outputs.py --models dlib-resnet,mobileface,hse-mobilenet

``group_replace.jpg`` needs donors: ``--donors BANK``, or else a temporary bank built from the
first 300 LFW people (``../shared/data/lfw``, FACECLOAK_DATA) with one or two photos. LFW is for
research use: neither its photos nor the bank are committed, only the replaced sample.
``group_replace_zoom.jpg`` shows each face, original above replaced, at exactly 2x, to judge seams;
``group_replace_mouth_zoom.jpg`` the same with ``--keep-mouth`` (the person's own lips) below.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facecloak.anonymize import anonymize_faces
from facecloak.cloak import create_cloak
from facecloak.detect import FaceDetector
from facecloak.io import read_image, to_uint8, write_image
from facecloak.models import available_embedders, create_embedder

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "samples" / "outputs"
GAIN = 10.0
ZOOM = 2
LEVELS = ("low", "mid", "high")


def lfw_bank(count: int = 300) -> str:
    """A temporary bank of the first ``count`` LFW people with one or two photos."""
    from facecloak.donors import add_donors

    data = Path(os.environ.get("FACECLOAK_DATA", REPO.parent / "shared" / "data")) / "lfw" / "images"
    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="facecloak-samples-")
    people = [p for p in sorted(data.iterdir()) if len(list(p.glob("*.jpg"))) <= 2][:count]
    models = [create_embedder(name, device="cpu") for name in available_embedders()]
    report = add_donors([sorted(p.glob("*.jpg"))[0] for p in people], models, bank="lfw", licence="LFW")
    print(report)
    return "lfw"


def make_replace(group, faces, detector, donors: str | None) -> None:
    """group_replace.jpg and 2x zooms of every face: original above, replaced below (and --keep-mouth)."""
    from facecloak.donor_bank import load_bank
    from facecloak.replace import FaceReplacer

    bank = load_bank(donors or lfw_bank())
    result = FaceReplacer(bank, detector=detector, seed=0)([group.pixels], faces)
    for record in result.records:
        print(
            {
                k: record.get(k)
                for k in (
                    "method",
                    "donors",
                    "protected",
                    "distance_to_original",
                    "distance_to_donors",
                    "donor_upscale",
                )
            }
        )
    replaced = result.images[0]
    write_image(OUT / "group_replace.jpg", replaced, source=group, overwrite=True, jpeg_quality=88)
    kept = FaceReplacer(bank, detector=detector, seed=0, keep_mouth=True)([group.pixels], faces).images[0]
    for name, versions in (
        ("group_replace_zoom.jpg", (group.pixels, replaced)),
        ("group_replace_mouth_zoom.jpg", (group.pixels, replaced, kept)),
    ):
        write_image(OUT / name, _zoomed_faces(faces, versions), overwrite=True, jpeg_quality=92)


def _zoomed_faces(faces, versions) -> torch.Tensor:
    """Each face at exactly 2x (no smoothing), one column per face, one row per version."""
    import torch.nn.functional as F

    columns = []
    for x1, y1, x2, y2 in sorted(faces.boxes.tolist()):
        side = 1.5 * max(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        top, left = max(0, int(cy - side / 2)), max(0, int(cx - side / 2))
        crops = [image[:, top : int(cy + side / 2), left : int(cx + side / 2)] for image in versions]
        stacked = torch.cat(crops, dim=1)[None]
        columns.append(F.interpolate(stacked, scale_factor=2, mode="nearest")[0])
    height = max(column.shape[1] for column in columns)
    columns = [F.pad(c, (0, 8, 0, height - c.shape[1]), value=0.5) for c in columns]
    return torch.cat(columns, dim=2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=None, help="models to attack [every available one]")
    parser.add_argument("--only", choices=["replace", "cloak"], default=None)
    parser.add_argument("--donors", default=None, help="donor bank for group_replace.jpg")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else available_embedders()
    OUT.mkdir(parents=True, exist_ok=True)
    detector = FaceDetector(device="cpu")
    group = read_image(REPO / "samples" / "group.jpg")
    faces = detector([group.pixels])
    if args.only != "cloak":
        make_replace(group, faces, detector, args.donors)
    if args.only == "replace":
        return
    for method in ("blur", "pixelate", "mask") if args.only is None else ():
        out = anonymize_faces(group.pixels[None], faces, method)[0]
        write_image(OUT / f"group_{method}.jpg", out, source=group, overwrite=True, jpeg_quality=88)
    models = [create_embedder(name, device="cpu") for name in names]
    print("models:", ", ".join(names))
    for name in ("astronaut", "grace_hopper"):
        photo = read_image(REPO / "samples" / f"{name}.jpg")
        found = detector([photo.pixels])
        tiles = []
        for level in LEVELS:
            # PNG, as the command line writes a cloak (`facecloak.defaults.CLOAK_OUTPUT_FORMAT`)
            target = OUT / f"{name}_cloaked_{level}.png"
            result = create_cloak("untargeted", models, level, detector=detector, seed=0)(
                [photo.pixels], found
            )
            cloaked = result.images[0]
            tiles.append(cloaked)
            write_image(target, cloaked, source=photo, overwrite=True)
            difference = ((cloaked - photo.pixels).abs() * GAIN).clamp(0, 1)
            x1, y1, x2, y2 = found.boxes[0].tolist()
            cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, 0.85 * max(x2 - x1, y2 - y1)
            top, left = max(0, int(cy - half)), max(0, int(cx - half))
            bottom, right = int(cy + half), int(cx + half)
            strip = torch.cat(
                [t[:, top:bottom, left:right] for t in (photo.pixels, cloaked, difference)], dim=2
            )
            write_image(OUT / f"{name}_strip_{level}.jpg", strip, overwrite=True, jpeg_quality=92)
            record = result.records(found)[0]
            print(
                name,
                level,
                {
                    k: record[k]
                    for k in ("dssim", "psnr", "linf", "ciede2000_mean", "ciede2000_p99", "protected")
                },
                {model: values["distance_after_jpeg75"] for model, values in record["models"].items()},
            )
        x1, y1, x2, y2 = found.boxes[0].tolist()
        cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, 0.75 * max(x2 - x1, y2 - y1)
        top, left = max(0, int(cy - half)), max(0, int(cx - half))
        crops = [to_uint8(t)[top : int(cy + half), left : int(cx + half)] for t in [photo.pixels, *tiles]]
        gap = np.full((crops[0].shape[0], 6, 3), 255, dtype=np.uint8)
        row = np.concatenate([part for crop in crops for part in (crop, gap)][:-1], axis=1)
        zoomed = Image.fromarray(row).resize((row.shape[1] * ZOOM, row.shape[0] * ZOOM), Image.NEAREST)
        zoomed.save(OUT / f"{name}_levels_2x.png", optimize=True)


if __name__ == "__main__":
    main()
