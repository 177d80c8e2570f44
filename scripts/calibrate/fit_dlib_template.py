"""Fit where MTCNN's five landmarks land in dlib's 150 px face chip (the card's template).

dlib aligns with its own 5-point shape predictor (eye corners, base of the nose); facecloak
detects with MTCNN (eye centres, nose tip, mouth corners). For real faces, this script runs
dlib's whole pipeline (HOG detector, 5-point predictor, `get_face_chip_details`, reproduced by
`facecloak.align.dlib_chip_from_image`), maps MTCNN's landmarks into dlib's chip, and takes
the mean position of each point: the least-squares similarity from MTCNN's points to that
template then reproduces dlib's chip. It also checks our chip against dlib's own
(`dlib.get_face_chip`) to within grey levels.

dlib-bin is a test/dev dependency only. Usage:
    python scripts/calibrate/fit_dlib_template.py [--images 1200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from facecloak.align import align_faces, dlib_chip_from_image, transform_points
from facecloak.detect import FaceDetector
from facecloak.io import read_image, to_uint8
from facecloak.models.dlib_format import locate_package_model
from facecloak.models.templates import DLIB_5POINT_TEMPLATE, dlib_template_pixels

DATA = Path(os.environ.get("FACECLOAK_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def shape_predictor_path() -> Path:
    return locate_package_model("shape_predictor_5_face_landmarks.dat")


def centre_index(centres: np.ndarray, width: int, height: int) -> int:
    return int(np.argmin(np.linalg.norm(centres - np.array([width / 2, height / 2]), axis=1)))


def main() -> None:
    import dlib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    files = sorted((DATA / "lfw" / "images").glob("*/*.jpg"))
    random.Random(1).shuffle(files)
    files = files[: args.images]
    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(shape_predictor_path()))
    detector = FaceDetector(device="cpu")
    template = dlib_template_pixels(torch.tensor(DLIB_5POINT_TEMPLATE), 150)
    mapped, chip_errors = [], []
    for path in files:
        image = read_image(path)
        array = to_uint8(image.pixels)
        height, width = array.shape[:2]
        found = hog(array, 1)
        faces = detector([image.pixels])
        if not len(found) or not len(faces):
            continue
        rect = found[
            centre_index(
                np.array([[(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2] for r in found]),
                width,
                height,
            )
        ]
        shape = predictor(array, rect)
        points = torch.tensor([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=torch.float32)[
            None
        ]
        chip_from_image = dlib_chip_from_image(points.double(), template.double(), 150).float()
        k = centre_index(((faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2).numpy(), width, height)
        mapped.append(transform_points(chip_from_image, faces.landmarks[k : k + 1])[0])
        if len(chip_errors) < 200:
            ours = align_faces(image.pixels[None], chip_from_image, torch.tensor([0]), 150)[0]
            theirs = (
                torch.from_numpy(dlib.get_face_chip(array, shape, size=150, padding=0.25))
                .permute(2, 0, 1)
                .float()
            )
            chip_errors.append(float((ours * 255 - theirs).abs().mean()))
    points = torch.stack(mapped)
    fitted = points.mean(0)
    spread = (points - fitted).norm(dim=-1).mean(0)
    result = {
        "faces": len(mapped),
        "template_150": [[round(float(x), 3), round(float(y), 3)] for x, y in fitted],
        "mean_point_scatter_px": [round(float(v), 3) for v in spread],
        "chip_vs_dlib_mean_abs_grey_levels": round(float(np.mean(chip_errors)), 4),
        "chip_vs_dlib_worst_face_grey_levels": round(float(np.max(chip_errors)), 4),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
