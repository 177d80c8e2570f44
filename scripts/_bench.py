"""Shared helpers of the benchmark scripts: devices, timing, shared data, JSON output."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from facecloak._allocator import tune_allocator

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """FACECLOAK_DATA, default ../shared/data beside the checkout."""
    return Path(os.environ.get("FACECLOAK_DATA", REPO.parent / "shared" / "data"))


def models_root() -> Path:
    """FACECLOAK_MODELS, default ../shared/models beside the checkout."""
    return Path(os.environ.get("FACECLOAK_MODELS", REPO.parent / "shared" / "models"))


def devices(requested: str | None) -> list[str]:
    """The devices to measure: the one asked for, else CPU and CUDA when present."""
    if requested:
        return [requested]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def synchronise(device: str) -> None:
    """Wait for queued GPU work, so wall time measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function: Callable[[], object], device: str, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` runs after ``warmup`` runs, in seconds."""
    for _ in range(warmup):
        function()
    synchronise(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronise(device)
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> dict:
    """What the numbers were measured on.

    ``cpu_capability`` is the vector instruction set torch's CPU kernels run with ("AVX2",
    "AVX512", ...). Two 2-core "AMD EPYC" machines of this project, one with AVX-512 and one
    without, cloaked the same one-face photo with three models in 2.0 and 4.1 s (docs/speed.md):
    a time means little without the CPU it ran on.
    """
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    """The CPU's model name as Linux reports it ("" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def write_json(path: Path, results: dict) -> None:
    """Print the results and write them as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written: {path}")


class Sampler:
    """Reads ``read()`` every ``every`` seconds on a thread while a ``with`` block runs."""

    def __init__(self, read: Callable[[], float], every: float) -> None:
        self.read, self.every = read, every
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.values.append(self.read())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def add_allocator_option(parser) -> None:
    """``--default-allocator``: measure with glibc's malloc as it is instead of as the CLI sets it."""
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc as it is (the command line tunes it: facecloak.tune_allocator)",
    )


def set_allocator(default: bool) -> bool:
    """Tune the allocator as the command line does, unless ``default``; whether it is tuned."""
    return False if default else tune_allocator()


def peak_rss_mb(function: Callable[[], object]) -> tuple[object, float]:
    """``function()``'s result and the process's peak resident memory while it ran, in MB.

    Sampled every 5 ms on a thread (psutil); without psutil, the process's peak so far.
    """
    try:
        import psutil
    except ImportError:
        import resource

        result = function()
        return result, round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    process = psutil.Process()
    before = process.memory_info().rss
    with Sampler(lambda: process.memory_info().rss, 0.005) as rss:
        result = function()
    peak = max(before, *rss.values, process.memory_info().rss)
    return result, round(peak / 2**20, 1)


CLOAK_CONSTANTS = (
    "DSSIM_PENALTY",
    "DSSIM_PENALTY_FROM",
    "DSSIM_SAFETY",
    "DSSIM_CHECK_EVERY",
    "FILL_BUDGET",
    "FILL_MAX_FACTOR",
    "COMPOSE_MAX_SHRINK",
    "EXTRA_STEPS_BELOW",
    "AVERAGE_DECAY",
    "AVERAGE_FROM",
    "WORKING_FACE_PX",
)
"""Constants of `facecloak.cloak.base` (and `facecloak.cloak.scale`) that the transfer scripts'
``--set NAME=VALUE`` may override."""


def set_cloak_constants(items: list[str], parser) -> None:
    """Apply ``--set NAME=VALUE`` items to `facecloak.cloak.base` or `.scale` (for this run only)."""
    from facecloak.cloak import base, scale

    for item in items:
        name, _, value = item.partition("=")
        if name not in CLOAK_CONSTANTS:
            parser.error(f"--set {name}: not one of {', '.join(CLOAK_CONSTANTS)}")
        module = base if hasattr(base, name) else scale
        setattr(module, name, type(getattr(module, name))(float(value)))
