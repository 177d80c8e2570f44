"""Cloak speed: seconds per one-face photo (end to end) and faces/s in batches, per level and device.

    python scripts/bench_cloak.py [--device cpu|cuda] [--levels low,mid,high] [--batch 32]
                                  [--out bench-results/cloak.json]

"One-face photo" is samples/astronaut.jpg (512x512) through detection, the cloak and the honest
JPEG-75 re-detection check: what `facecloak cloak photo.jpg` spends per photo after start-up.
Batch throughput cloaks --batch LFW photos (one face each) in one optimisation. With MobileFace
in ../shared/models, the two-model ensemble (dlib-resnet + MobileFace) is measured too, and with
the HSE MobileNet beside it the three-model one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _bench import REPO, data_root, devices, machine, models_root, synchronise, write_json
from facecloak.cloak import create_cloak
from facecloak.detect import FaceDetector
from facecloak.io import read_image
from facecloak.models import create_embedder

HSE_THRESHOLD = 0.3461
"""`facecloak models calibrate hse-mobilenet ../shared/data/lfw/images --max-photos 600` (FAR 1e-3)."""


def ensembles(device: str) -> dict[str, list]:
    dlib = create_embedder("dlib-resnet", device=device)
    found = {"dlib-resnet": [dlib]}
    symbol = models_root() / "mobileface-v2" / "MobileFace_Identification_V2-symbol.json"
    if symbol.is_file():
        from facecloak.models.plugins import load_model_file

        mobileface = load_model_file(
            symbol, input_size=112, template="arcface", metric="cosine", name="mobileface-v2"
        )
        found["dlib-resnet+mobileface-v2"] = [dlib, mobileface.to(device)]
        hse = models_root() / "hse-mobilenet-vggface2" / "hse_mobilenet_vggface2.onnx"
        if hse.is_file():
            box_model = load_model_file(
                hse,
                name="hse-mobilenet",
                input_size=224,
                crop="box",
                margin=10,
                layout="nhwc",
                bgr=True,
                mean=(103.939, 116.779, 123.68),
                threshold=HSE_THRESHOLD,
            )
            found["dlib-resnet+mobileface-v2+hse-mobilenet"] = [
                dlib,
                mobileface.to(device),
                box_model.to(device),
            ]
    return found


def one_face_photo(models, level: str, device: str, detector: FaceDetector, repeats: int) -> dict:
    image = read_image(REPO / "samples" / "astronaut.jpg").pixels
    cloak = create_cloak("untargeted", models, level, detector=detector)
    cloak([image], detector([image]))  # warm-up
    times, steps, protected = [], [], []
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        faces = detector([image])
        result = cloak([image], faces)
        synchronise(device)
        times.append(time.perf_counter() - start)
        steps.append(int(result.steps[0]))
        protected.append(bool(result.protected[0]))
    return {"seconds_per_photo": round(min(times), 3), "steps": steps[0], "protected": all(protected)}


def batch_throughput(models, level: str, device: str, detector: FaceDetector, batch: int) -> dict | None:
    folder = data_root() / "lfw" / "images"
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*/*_0001.jpg"))[:batch]
    images = [read_image(f).pixels for f in files]
    faces = detector(images)
    keep = []
    for i in range(len(images)):  # one face per photo: the centre one
        mine = (faces.image_index == i).nonzero()[:, 0]
        if len(mine):
            centres = (faces.boxes[mine, :2] + faces.boxes[mine, 2:]) / 2
            keep.append(int(mine[(centres - 125).norm(dim=1).argmin()]))
    faces = faces.select(keep)
    cloak = create_cloak("untargeted", models, level, detector=detector, verify=False)
    synchronise(device)
    start = time.perf_counter()
    result = cloak(images, faces)
    synchronise(device)
    seconds = time.perf_counter() - start
    return {
        "faces": len(faces),
        "seconds": round(seconds, 2),
        "faces_per_s": round(len(faces) / seconds, 2),
        "mean_steps": round(float(result.steps.float().mean()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--levels", default="low,mid,high")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ensembles", default=None, help="only these model sets (comma-separated names)")
    parser.add_argument("--no-batch", action="store_true", help="skip the batch throughput run")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "cloak.json")
    args = parser.parse_args()
    results = {"machine": machine(), "results": []}
    for device in devices(args.device):
        detector = FaceDetector(device=device)
        for name, models in ensembles(device).items():
            if args.ensembles and name not in args.ensembles.split(","):
                continue
            for level in args.levels.split(","):
                row = {"models": name, "device": device, "level": level}
                row["one_face_photo"] = one_face_photo(models, level, device, detector, args.repeats)
                batch = args.batch if device == "cpu" else max(args.batch, 256)
                row["batch"] = (
                    None if args.no_batch else batch_throughput(models, level, device, detector, batch)
                )
                results["results"].append(row)
                print(row, flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
