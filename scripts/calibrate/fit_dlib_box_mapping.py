"""Fit `facecloak.models.dlib_shape.MTCNN_TO_DLIB_BOX`: MTCNN's face box -> dlib HOG's box.

dlib's 5-point shape predictor was trained on the boxes of dlib's HOG detector
(``get_frontal_face_detector``), which are square, tighter and lower on the face than MTCNN's.
For the same face in real photos (LFW, the face nearest the image centre, found by both), this
script fits by least squares, in pixels, four numbers:

    centre_x(dlib) = centre_x(mtcnn) + c0 * width(mtcnn)
    centre_y(dlib) = centre_y(mtcnn) + c1 * height(mtcnn)
    span_x(dlib)   = c2 * width(mtcnn)
    span_y(dlib)   = c3 * height(mtcnn)

where dlib's box is ``(left, top, right, bottom)`` of its inclusive rectangle and ``span = right -
left`` (what the predictor's normalised frame spans). It then reports how far our predictor's
landmarks on mapped MTCNN boxes land from dlib's own landmarks on its HOG boxes, on faces not
used for the fit (a third of them) and on all; the constants printed are fitted on all faces.

dlib-bin is a test/dev dependency only. Usage:
    python scripts/calibrate/fit_dlib_box_mapping.py [--images 400] [--upsample 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from facecloak.detect import FaceDetector
from facecloak.io import read_image, to_uint8
from facecloak.models.dlib_shape import load_shape_predictor, locate_shape_predictor

DATA = Path(os.environ.get("FACECLOAK_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def nearest_to_centre(centres: np.ndarray, width: int, height: int) -> int:
    return int(np.argmin(np.linalg.norm(centres - np.array([width / 2, height / 2]), axis=1)))


def collect(files: list[Path], upsample: int) -> dict[str, np.ndarray]:
    """MTCNN box, dlib HOG box, dlib's landmarks on it, and the grey image, per paired face."""
    import dlib

    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(locate_shape_predictor()))
    detector = FaceDetector(device="cpu")
    mtcnn, hog_boxes, landmarks, greys = [], [], [], []
    for path in files:
        image = read_image(path)
        array = to_uint8(image.pixels)
        height, width = array.shape[:2]
        rects = hog(array, upsample)
        faces = detector([image.pixels])
        if not len(rects) or not len(faces):
            continue
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], dtype=np.float64)
        rect = rects[nearest_to_centre((boxes[:, :2] + boxes[:, 2:]) / 2, width, height)]
        box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float64)
        mtcnn_boxes = faces.boxes.double().numpy()
        k = nearest_to_centre((mtcnn_boxes[:, :2] + mtcnn_boxes[:, 2:]) / 2, width, height)
        # the same face: dlib's centre must lie inside MTCNN's box
        centre = (box[:2] + box[2:]) / 2
        if not (mtcnn_boxes[k, :2] < centre).all() or not (centre < mtcnn_boxes[k, 2:]).all():
            continue
        shape = predictor(array, rect)
        mtcnn.append(mtcnn_boxes[k])
        hog_boxes.append(box)
        landmarks.append([[p.x, p.y] for p in shape.parts()])
        greys.append((array.astype(np.int32).sum(axis=2) // 3).astype(np.uint8))
    return {
        "mtcnn": np.array(mtcnn),
        "hog": np.array(hog_boxes),
        "landmarks": np.array(landmarks, dtype=np.float64),
        "greys": greys,
    }


def fit(mtcnn: np.ndarray, hog: np.ndarray) -> np.ndarray:
    """Least-squares (in pixels) ``(c0, c1, c2, c3)``; each is a one-parameter fit through 0."""
    size = mtcnn[:, 2:] - mtcnn[:, :2]  # (N, 2) MTCNN width, height
    shift = (hog[:, :2] + hog[:, 2:]) / 2 - (mtcnn[:, :2] + mtcnn[:, 2:]) / 2
    span = hog[:, 2:] - hog[:, :2]
    offset = (size * shift).sum(0) / (size * size).sum(0)
    scale = (size * span).sum(0) / (size * size).sum(0)
    return np.concatenate([offset, scale])


def apply(coefficients: np.ndarray, mtcnn: np.ndarray) -> np.ndarray:
    size = mtcnn[:, 2:] - mtcnn[:, :2]
    centre = (mtcnn[:, :2] + mtcnn[:, 2:]) / 2 + coefficients[:2] * size
    half = coefficients[2:] * size / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def landmark_errors(predictor, data: dict, coefficients: np.ndarray, index: np.ndarray) -> dict[str, float]:
    """Distances (px) between our landmarks on mapped MTCNN boxes and dlib's on its HOG boxes."""
    boxes = apply(coefficients, data["mtcnn"][index])
    errors = []
    for box, i in zip(boxes, index, strict=True):
        points = predictor.predict(data["greys"][i], torch.from_numpy(box[None]).double())[0].numpy()
        errors.append(np.linalg.norm(points - data["landmarks"][i], axis=1))
    errors = np.array(errors)  # (faces, points)
    hog_size = (data["hog"][index, 2] - data["hog"][index, 0]).mean()
    return {
        "faces": len(index),
        "mean_px": round(float(errors.mean()), 3),
        "median_px": round(float(np.median(errors)), 3),
        "p95_px": round(float(np.percentile(errors, 95)), 3),
        "max_px": round(float(errors.max()), 3),
        "mean_over_box_width": round(float(errors.mean() / hog_size), 4),
        "mean_per_point_px": [round(float(v), 3) for v in errors.mean(axis=0)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--upsample", type=int, default=1, help="HOG upsampling (face_recognition: 1)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    files = sorted((DATA / "lfw" / "images").glob("*/*.jpg"))
    random.Random(2).shuffle(files)
    data = collect(files[: args.images], args.upsample)
    count = len(data["mtcnn"])
    train, held_out = np.arange(count) < 2 * count // 3, np.arange(count) >= 2 * count // 3
    predictor = load_shape_predictor()
    partial = fit(data["mtcnn"][train], data["hog"][train])
    coefficients = fit(data["mtcnn"], data["hog"])
    residual = apply(coefficients, data["mtcnn"]) - data["hog"]
    result = {
        "faces": count,
        "hog_upsample": args.upsample,
        "MTCNN_TO_DLIB_BOX": [round(float(c), 4) for c in coefficients],
        "coefficients_fitted_on_two_thirds": [round(float(c), 4) for c in partial],
        "box_corner_residual_rms_px": round(float(np.sqrt(np.mean(residual**2))), 3),
        "mean_hog_box_span_px": round(float((data["hog"][:, 2] - data["hog"][:, 0]).mean()), 2),
        "landmarks_vs_dlib_held_out": landmark_errors(predictor, data, partial, np.flatnonzero(held_out)),
        "landmarks_vs_dlib_all": landmark_errors(predictor, data, coefficients, np.arange(count)),
        "landmarks_vs_dlib_unmapped_mtcnn_box": landmark_errors(
            predictor, data, np.array([0.0, 0.0, 1.0, 1.0]), np.arange(count)
        ),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
