"""Regenerate the before/after images of the README (samples/outputs/), deterministically.

    python scripts/make_sample_outputs.py

For each mode: the protected photo, and for cloaks a difference image |cloaked - original| x 10
and a side-by-side strip (original | cloaked | difference) of the face.
"""

from __future__ import annotations

from pathlib import Path

import torch

from facecloak.anonymize import anonymize_faces
from facecloak.cloak import create_cloak
from facecloak.detect import FaceDetector
from facecloak.io import read_image, write_image
from facecloak.models import create_embedder

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "samples" / "outputs"
GAIN = 10.0


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    detector = FaceDetector(device="cpu")
    group = read_image(REPO / "samples" / "group.jpg")
    faces = detector([group.pixels])
    for method in ("blur", "pixelate", "mask"):
        out = anonymize_faces(group.pixels[None], faces, method)[0]
        write_image(OUT / f"group_{method}.jpg", out, source=group, overwrite=True, jpeg_quality=88)
    model = create_embedder("dlib-resnet", device="cpu")
    for name, levels in (("astronaut", ("low", "mid", "high")), ("grace_hopper", ("mid",))):
        photo = read_image(REPO / "samples" / f"{name}.jpg")
        found = detector([photo.pixels])
        for level in levels:
            result = create_cloak("untargeted", [model], level, detector=detector, seed=0)(
                [photo.pixels], found
            )
            cloaked = result.images[0]
            write_image(
                OUT / f"{name}_cloaked_{level}.jpg", cloaked, source=photo, overwrite=True, jpeg_quality=92
            )
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
                {k: record[k] for k in ("dssim", "psnr", "linf", "protected")},
                record["models"]["dlib-resnet"],
            )


if __name__ == "__main__":
    main()
