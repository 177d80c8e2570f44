"""Detection alone: ms per photo and page faults per photo, with glibc's allocator tuned or not.

    python scripts/bench_detect.py [--images 96] [--chunk 8] [--threads 1,2] [--rounds 2]
                                   [--out bench-results/detect.json]

Batched MTCNN (`facecloak.FaceDetector`) over ``--images`` LFW photos in chunks of ``--chunk``,
on the CPU with each ``--threads`` count. Each measurement runs in a fresh process, alternately
with the allocator as the command line sets it (`facecloak.tune_allocator`) and with glibc's
defaults, for ``--rounds`` rounds: the setting is process-wide and cannot be undone in place.
Reported per row: the best pass of three (after a warm-up) in ms per photo, and that pass's minor
page faults and system CPU seconds per photo (what freeing memory to the kernel and faulting it in
again costs).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _bench import REPO, machine, set_allocator, write_json


def measure(images: int, chunk: int, threads: int, tuned: bool) -> dict:
    """One process's measurement (the ``--child`` side)."""
    import torch

    from bench_anonymize import lfw_sample
    from facecloak.detect import FaceDetector
    from facecloak.io import read_image

    torch.set_num_threads(threads)
    applied = set_allocator(default=not tuned)
    photos = [read_image(path).pixels for path in lfw_sample(images)]
    detector = FaceDetector(device="cpu")

    def one_pass() -> int:
        return sum(len(detector(photos[i : i + chunk])) for i in range(0, len(photos), chunk))

    one_pass()
    best = None
    for _ in range(3):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        faces = one_pass()
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        row = {
            "ms_per_photo": round(seconds / len(photos) * 1000, 2),
            "page_faults_per_photo": round((after.ru_minflt - before.ru_minflt) / len(photos), 1),
            "system_ms_per_photo": round((after.ru_stime - before.ru_stime) / len(photos) * 1000, 3),
            "faces": faces,
        }
        if best is None or row["ms_per_photo"] < best["ms_per_photo"]:
            best = row
    return {"threads": threads, "allocator_tuned": applied, "chunk": chunk, "photos": len(photos), **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "detect.json")
    parser.add_argument("--child", nargs=2, metavar=("THREADS", "TUNED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        threads, tuned = int(args.child[0]), args.child[1] == "1"
        print(json.dumps(measure(args.images, args.chunk, threads, tuned)))
        return
    rows = []
    for _ in range(max(1, args.rounds)):
        for threads in (int(t) for t in args.threads.split(",")):
            for tuned in (True, False):
                command = [sys.executable, __file__, "--images", str(args.images), "--chunk", str(args.chunk)]
                done = subprocess.run(
                    [*command, "--child", str(threads), "1" if tuned else "0"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    write_json(args.out, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
