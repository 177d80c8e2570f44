"""Kill -9 a 200-photo batch in the middle, run the same command again, and check the result.

    python scripts/crash_resume_demo.py [--photos 200] [--kill-after 60] [--method blur]

Copies photos (the shared LFW faces when present, else the samples) into a temporary folder,
starts ``facecloak anonymize DIR -o OUT --json``, sends SIGKILL once the journal holds
``--kill-after`` finished photos, runs the same command again, and prints JSON: photos, done before
the kill, skipped by the resumed run, each photo done exactly once, every output decodes, no
temporary file left, and the times. Exit code 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _bench import REPO, data_root
from facecloak.errors import ImageReadError
from facecloak.io import read_image
from facecloak.journal import JOURNAL_NAME, read_journal


def make_photos(folder: Path, count: int) -> list[Path]:
    lfw = data_root() / "lfw" / "images"
    sources = sorted(lfw.rglob("*.jpg"))[:count] if lfw.is_dir() else []
    while len(sources) < count:
        sources += sorted((REPO / "samples").glob("*.jpg"))
    made = []
    for i, source in enumerate(sources[:count]):
        target = folder / f"part{i % 4}" / f"{i:04d}_{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        made.append(target)
    return made


def done(out: Path) -> list[dict]:
    return [r for r in read_journal(out) if r.get("event") == "done"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--kill-after", type=int, default=60, help="finished photos before the SIGKILL")
    parser.add_argument("--method", default="blur", choices=["blur", "pixelate", "mask"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="facecloak-crash-"))
    photos, out = root / "photos", root / "out"
    inputs = make_photos(photos, args.photos)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    command = [
        sys.executable,
        "-c",
        "from facecloak.cli import main; main()",
        "anonymize",
        str(photos),
        "-o",
        str(out),
        "--method",
        args.method,
        "-q",
        "--json",
    ]

    started = time.perf_counter()
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(done(out)) < args.kill_after and first.poll() is None:
        time.sleep(0.01)
    killed = first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    first_s = time.perf_counter() - started
    done_before = len(done(out))
    torn_outputs = 0
    for output in out.rglob(f"*_{args.method}.*"):
        try:
            read_image(output)
        except ImageReadError:
            torn_outputs += 1
    temporary_after_kill = len([p for p in out.rglob(".facecloak-*") if p.name != JOURNAL_NAME])

    started = time.perf_counter()
    second = subprocess.run(command, env=env, capture_output=True, timeout=3600)
    second_s = time.perf_counter() - started
    report = json.loads(second.stdout)

    counts = Counter(r["input"] for r in done(out))
    undecodable = 0
    for path in inputs:
        relative = path.relative_to(photos)
        try:
            read_image(out / relative.with_name(f"{path.stem}_{args.method}.jpg"))
        except ImageReadError:
            undecodable += 1
    result = {
        "photos": len(inputs),
        "killed_mid_batch": killed,
        "done_before_kill": done_before,
        "partial_files_under_final_names_after_kill": torn_outputs,
        "temporary_files_after_kill": temporary_after_kill,
        "resumed_run_exit_code": second.returncode,
        "resumed_run_skipped": report["resumed_files"],
        "resumed_run_processed": report["images"] - report["resumed_files"],
        "done_exactly_once": len(counts) == len(inputs) and set(counts.values()) == {1},
        "outputs_missing_or_corrupt": undecodable,
        "temporary_files_left": len([p for p in out.rglob(".facecloak-*") if p.name != JOURNAL_NAME]),
        "first_run_until_kill_s": round(first_s, 2),
        "resumed_run_s": round(second_s, 2),
    }
    ok = (
        killed
        and torn_outputs == 0
        and result["done_exactly_once"]
        and undecodable == 0
        and result["resumed_run_skipped"] == done_before
        and result["temporary_files_left"] == 0
    )
    result["ok"] = bool(ok)
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(root)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
