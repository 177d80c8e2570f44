"""Cloak speed: seconds per one-face photo, faces/s in batches, and the whole pipeline, per device.

    python scripts/bench_cloak.py [--device cpu|cuda] [--levels low,mid,high] [--batch 32] [--loop-cost]
                                  [--pipeline N] [--chunk C] [--precisions float32,bfloat16]
                                  [--out bench-results/cloak.json]

"One-face photo" is samples/astronaut.jpg (512x512) through detection, the cloak and the honest
JPEG-75 re-detection check: what `facecloak cloak photo.jpg` spends per photo after start-up; the
same is timed on samples/grace_hopper.jpg (a face that lags: mid's extra steps) and on that photo
upscaled 5x (7.7 MP, a phone portrait's face size: the cloak's working scale), `--photos`.
Batch throughput cloaks --batch LFW photos (one face each) in one optimisation. The whole pipeline
(default on a GPU: 4096 photos; `--pipeline N` on the CPU) runs `facecloak cloak DIR -o OUT` as the
CLI does, files in and files out, and reports faces/s, per-stage seconds, protection, GPU
utilisation (NVML) and peak GPU memory. With MobileFace in ../shared/models, the two-model ensemble
(dlib-resnet + MobileFace) is measured too, and with the HSE MobileNet beside it the three-model
one. FACECLOAK_DATA and FACECLOAK_MODELS point elsewhere than ../shared. ``--loop-cost`` also
times each one-face photo's optimisation with every model replaced by a stub (`StubEmbedder`),
over the same steps: the loop's own cost per step, which faster models would not shrink.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from _bench import (
    REPO,
    Sampler,
    add_allocator_option,
    data_root,
    devices,
    machine,
    models_root,
    set_allocator,
    synchronise,
    write_json,
)
from facecloak._device import cloak_batch_size, compute_workers
from facecloak.cloak import create_cloak
from facecloak.defaults import DISTANCE_AFTER_UPLOAD_KEY
from facecloak.detect import FaceDetector
from facecloak.io import read_image
from facecloak.models import create_embedder
from facecloak.models.registry import Embedder
from facecloak.transforms import levels_8bit

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


LARGE_UPSCALE = 5
"""The large one-face photo: Grace Hopper's sample upscaled this much (3000 x 2560, 7.7 MP, the face
about 890 pixels wide, as in a phone's portrait), to time the working scale (`facecloak.cloak.scale`)."""

ONE_FACE_PHOTOS = ("astronaut", "grace_hopper", "large")
"""The one-face photos timed: the astronaut (512 x 512, past every model within 40 steps), Grace
Hopper (600 x 512, a face MobileFace lags on: mid's 20 extra steps) and the large one."""


def one_face_image(name: str) -> torch.Tensor:
    """One of `ONE_FACE_PHOTOS`, as pixels."""
    if name != "large":
        return read_image(REPO / "samples" / f"{name}.jpg").pixels
    photo = read_image(REPO / "samples" / "grace_hopper.jpg").pixels
    large = F.interpolate(photo[None], scale_factor=LARGE_UPSCALE, mode="bicubic", align_corners=False)[0]
    return levels_8bit(large.clamp(0, 1)).float() / 255


def one_face_photo(
    models, level: str, device: str, detector: FaceDetector, repeats: int, image: torch.Tensor
) -> dict:
    cloak = create_cloak("untargeted", models, level, detector=detector)
    cloak([image], detector([image]))  # warm-up
    times, steps, protected, stages = [], [], [], []
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        faces = detector([image])
        detected = time.perf_counter()
        result = cloak([image], faces)
        synchronise(device)
        times.append(time.perf_counter() - start)
        steps.append(int(result.steps[0]))
        protected.append(bool(result.protected[0]))
        stages.append({"detect": round(detected - start, 4), **result.timings})
    best = min(range(len(times)), key=times.__getitem__)
    record = result.records(faces)[0]
    return {
        "size": list(image.shape[-2:]),
        "seconds_per_photo": round(times[best], 3),
        "steps": steps[0],
        "protected": all(protected),
        "working_factor": record["working_factor"],
        "distance_after_jpeg_over_threshold": {
            name: None
            if m[DISTANCE_AFTER_UPLOAD_KEY] is None
            else round(m[DISTANCE_AFTER_UPLOAD_KEY] / m["threshold"], 3)
            for name, m in record["models"].items()
        },
        "face_dssim": record["dssim"],
        "ciede2000_mean": record["ciede2000_mean"],
        "stage_seconds": stages[best],  # of the fastest run: where a photo's time goes
    }


class StubEmbedder(Embedder):
    """A model's card with next to no network: an 8x8 average pooling and one matrix product.

    A cloak run with stubs in place of its models does every step's own work (the simulated
    upload, sampling each model's chip and its backward pass, the DSSIM terms, the limits, Adam)
    for the same chips, so its optimisation time is the loop's own cost (`loop_cost`).
    """

    def __init__(self, model: Embedder) -> None:
        super().__init__()
        self.card = model.card
        self.project = torch.nn.Linear(3 * 64, 128, bias=False).requires_grad_(False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(F.adaptive_avg_pool2d(chips, 8).flatten(1)), dim=1)


def loop_cost(
    models, level: str, device: str, detector: FaceDetector, repeats: int, image: torch.Tensor, timed: dict
) -> dict:
    """The loop's own cost: ``image``'s optimisation with stubs for the models, over the same steps.

    ``timed`` is `one_face_photo`'s row for the same photo and models: its steps and its fastest
    run's optimisation time, so the real models are not run again. The difference is the models'
    forward and backward passes; the stubs' time is the loop's own work, which does not shrink
    with faster models.
    """
    steps, optimise = timed["steps"], timed["stage_seconds"]["optimise"]
    stubs = [StubEmbedder(m).to(device) for m in models]
    cloak = create_cloak("untargeted", stubs, level, detector=detector, steps=steps)
    faces = detector([image])
    cloak([image], faces)  # warm-up
    loop = min(cloak([image], faces).timings["optimise"] for _ in range(repeats))
    return {
        "steps": steps,
        "optimise_seconds": round(optimise, 3),
        "loop_seconds": round(loop, 3),
        "loop_ms_per_step": round(1000 * loop / steps, 1),
        "models_share": round(1 - loop / optimise, 3),
    }


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


class _TimedDetector:
    """The pipeline's detector, timed (GPU work included)."""

    def __init__(self, detector: FaceDetector, device: str) -> None:
        self.detector, self.device, self.seconds = detector, device, 0.0

    def __call__(self, images):
        start = time.perf_counter()
        faces = self.detector(images)
        synchronise(self.device)
        self.seconds += time.perf_counter() - start
        return faces


class _StageTotals:
    """Wraps a cloak so the pipeline's calls add up their per-stage seconds and peak memory.

    On a CPU the pipeline runs two chunks at once on copies (`CloakFaces.for_worker`): a copy
    wraps its own copy of the cloak and adds to the same totals (thread seconds, summed).
    """

    def __init__(self, cloak) -> None:
        self.cloak, self.totals, self.faces = cloak, {}, 0
        self.lock = threading.Lock()

    def __getattr__(self, name: str):  # budget, dropout, ...: the cloak's
        return getattr(self.__dict__["cloak"], name)

    def __copy__(self) -> _StageTotals:
        twin = _StageTotals.__new__(_StageTotals)
        twin.__dict__.update(self.__dict__, cloak=copy.copy(self.cloak), _shared=self.__dict__)
        return twin

    def __call__(self, images, faces, **kwargs):
        result = self.cloak(images, faces, **kwargs)
        shared = self.__dict__.get("_shared", self.__dict__)
        with self.lock:
            for stage, seconds in result.timings.items():
                shared["totals"][stage] = shared["totals"].get(stage, 0.0) + seconds
            shared["faces"] += len(faces)
        return result


def gpu_utilisation() -> Sampler | None:
    """A `Sampler` of the GPU's utilisation (NVML, every 0.2 s), or None where NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except Exception:  # no NVML here: utilisation is not reported
        return None
    return Sampler(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu, 0.2)


def staged_photos(count: int, workdir: Path) -> Path | None:
    """A folder of ``count`` LFW photos (copies of the first ones, repeated if the set is smaller)."""
    folder = data_root() / "lfw" / "images"
    sources = sorted(folder.glob("*/*.jpg"))
    if not sources:
        return None
    target = workdir / "in"
    target.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        source = sources[k % len(sources)]
        shutil.copyfile(source, target / f"{k:05d}_{source.name}")
    return target


def whole_pipeline(
    models,
    level: str,
    device: str,
    photos: int,
    chunk: int,
    precision: str | None,
    eot: int | None,
    row_seconds: float,
    workers: int | None = None,
    min_chunks: int = 1,
) -> dict | None:
    """Files in, files out, as `facecloak cloak DIR -o OUT --batch-size CHUNK` runs it.

    A few photos first as a warm-up (CUDA's start, the models' first passes); the timed photos are
    cut to what the warm-up's rate finishes in about ``row_seconds``, ``min_chunks`` chunks at least
    (two workers overlap only where there are several chunks).
    ``workers``: chunks in flight at once (default: the pipeline's, 2 on a CPU and 1 on a GPU;
    on a GPU, 2 lets one chunk's CPU stages run while the other's optimisation holds the GPU).
    """
    from facecloak.batch_types import Options
    from facecloak.pipeline import run_resumable_batch
    from facecloak.protection import CloakFaces

    with tempfile.TemporaryDirectory() as workdir:
        source = staged_photos(photos + chunk, Path(workdir))
        if source is None:
            return None
        files = sorted(source.iterdir())
        warm, timed_files = files[: min(chunk, 64)], files[chunk:]
        detector = _TimedDetector(FaceDetector(device=device), device)
        cloak = create_cloak(
            "untargeted", models, level, detector=detector.detector, precision=precision, eot_samples=eot
        )
        stages = _StageTotals(cloak)
        protection = CloakFaces(stages)
        options = Options(out_dir=str(Path(workdir) / "out"), chunk=chunk, device=device)
        tick = time.perf_counter()
        batch = functools.partial(run_resumable_batch, settings={}, detector=detector, workers=workers)
        batch(warm, protection, options)  # warm-up
        rate = len(warm) / (time.perf_counter() - tick)
        fits = max(chunk * min_chunks, int(rate * row_seconds) // chunk * chunk)
        timed_files = timed_files[:fits]
        detector.seconds, stages.totals, stages.faces = 0.0, {}, 0
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        synchronise(device)
        sampler = gpu_utilisation() if device.startswith("cuda") else None
        with sampler or contextlib.nullcontext():
            start = time.perf_counter()
            report = batch(timed_files, protection, options)
            synchronise(device)
            seconds = time.perf_counter() - start
    faces = [face for outcome in report.outcomes for face in outcome.faces]
    protected = sum(1 for face in faces if face.get("protected"))
    dssim = [face["dssim"] for face in faces if "dssim" in face]
    ciede = [face["ciede2000_mean"] for face in faces if "ciede2000_mean" in face]
    row = {
        "photos": len(timed_files),
        "faces": len(faces),
        "chunk": chunk,
        "workers": workers or compute_workers(device),
        "precision": cloak.precision,
        "eot_samples": cloak.eot_samples,
        "seconds": round(seconds, 2),
        "photos_per_s": round(len(timed_files) / seconds, 1),
        "faces_per_s": round(len(faces) / seconds, 1),
        "protected_share": round(protected / max(1, len(faces)), 3),
        "mean_dssim": round(sum(dssim) / max(1, len(dssim)), 5),
        "mean_ciede2000": round(sum(ciede) / max(1, len(ciede)), 3),
        "stage_seconds": {
            "decode (reader threads, summed)": report.timings.get("decode_s"),
            "detect": round(detector.seconds, 2),
            **{f"cloak {stage}": round(value, 2) for stage, value in stages.totals.items()},
            "write (writer thread)": report.timings.get("write_s"),
        },
        "failed_files": sum(outcome.status == "failed" for outcome in report.outcomes),
    }
    if device.startswith("cuda"):
        busy = sampler.values if sampler else []
        row["gpu_utilisation_mean_pct"] = round(sum(busy) / len(busy), 1) if busy else None
        row["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def profiled(measure, out: Path):
    """``measure`` run under `torch.profiler`: the busiest operators and kernels, and how busy the GPU was.

    The table (by device time, then by CPU time) is written beside ``out``; the row gains the
    sum of kernel time against the wall time, which says whether the GPU or the host bounds it.
    """

    def run(*args):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        start = time.perf_counter()
        with profile(activities=activities) as trace:
            row = measure(*args)
        wall = time.perf_counter() - start
        averages = trace.key_averages()
        kernels = [event for event in averages if event.device_type == torch.autograd.DeviceType.CUDA]
        kernel_us = sum(event.self_device_time_total for event in kernels)
        tables = [
            averages.table(sort_by="self_device_time_total", row_limit=25),
            averages.table(sort_by="self_cpu_time_total", row_limit=25),
        ]
        out.with_suffix(".profile.txt").write_text("\n\n".join(tables))
        row["profile"] = {
            "wall_s": round(wall, 2),
            "kernel_s": round(kernel_us / 1e6, 2),
            "kernels": sum(event.count for event in kernels),
        }
        return row

    return run


def _attempt(measure, *args):
    """One measurement; a failure is reported in its row and the benchmark goes on."""
    try:
        return measure(*args)
    except Exception as error:  # noqa: BLE001 - a benchmark row, not a program path
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--levels", default="low,mid,high")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ensembles", default=None, help="only these model sets (comma-separated names)")
    parser.add_argument("--no-batch", action="store_true", help="skip the batch throughput run")
    parser.add_argument(
        "--pipeline",
        type=int,
        default=None,
        help="photos for the whole-pipeline run (files in, files out; default 0 on the CPU, 4096 on a GPU)",
    )
    parser.add_argument("--chunk", type=int, default=None, help="pipeline photos per optimisation")
    parser.add_argument("--precisions", default=None, help="pipeline precisions, e.g. float32,bfloat16")
    parser.add_argument("--eot", type=int, default=None, help="random draws per step (default: the cloak's)")
    parser.add_argument(
        "--workers", default=None, help="pipeline chunks in flight at once, e.g. 1,2 (default: pipeline's)"
    )
    parser.add_argument("--row-seconds", type=float, default=60.0, help="rough cap per pipeline row")
    parser.add_argument("--min-chunks", type=int, default=1, help="pipeline chunks per row at least")
    parser.add_argument("--profile", action="store_true", help="profile the batch run (torch.profiler)")
    parser.add_argument("--no-single", action="store_true", help="skip the one-face-photo timing")
    parser.add_argument(
        "--loop-cost",
        action="store_true",
        help="also time each one-face photo's optimisation with stub models: the loop's own cost",
    )
    parser.add_argument(
        "--photos", default=",".join(ONE_FACE_PHOTOS), help="one-face photos to time (of ONE_FACE_PHOTOS)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "cloak.json")
    add_allocator_option(parser)
    args = parser.parse_args()
    tuned = set_allocator(args.default_allocator)
    results = {"machine": machine(), "allocator_tuned": tuned, "results": []}
    for device in devices(args.device):
        detector = FaceDetector(device=device)
        for name, models in ensembles(device).items():
            if args.ensembles and name not in args.ensembles.split(","):
                continue
            for level in args.levels.split(","):
                row = {"models": name, "device": device, "level": level}
                if not args.no_single:
                    for photo in args.photos.split(","):
                        key = "one_face_photo" if photo == "astronaut" else f"one_face_photo_{photo}"
                        image = one_face_image(photo)
                        row[key] = _attempt(
                            one_face_photo, models, level, device, detector, args.repeats, image
                        )
                        print(key, row[key], flush=True)
                        if args.loop_cost and "error" not in row[key]:
                            run = (models, level, device, detector, args.repeats, image, row[key])
                            loop = _attempt(loop_cost, *run)
                            row[f"loop_cost_{photo}"] = loop
                            print(f"loop_cost_{photo}", loop, flush=True)
                batch = args.batch if device == "cpu" else max(args.batch, 256)
                if not args.no_batch:
                    measure = profiled(batch_throughput, args.out) if args.profile else batch_throughput
                    row["batch"] = _attempt(measure, models, level, device, detector, batch)
                photos = args.pipeline if args.pipeline is not None else (0 if device == "cpu" else 4096)
                if photos:
                    chunk = args.chunk or cloak_batch_size(device)
                    row["pipeline"] = []
                    counts = [int(w) for w in args.workers.split(",")] if args.workers else [None]
                    for precision in args.precisions.split(",") if args.precisions else [None]:
                        for workers in counts:
                            run = (models, level, device, photos, chunk, precision, args.eot)
                            timing = (args.row_seconds, workers, args.min_chunks)
                            row["pipeline"].append(_attempt(whole_pipeline, *run, *timing))
                            print(row["pipeline"][-1], flush=True)
                results["results"].append(row)
                print(row, flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
