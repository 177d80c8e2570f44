"""Load test of `facecloak serve` on loopback: requests/s and p50/p95 latency, errors, memory.

    python scripts/bench_service.py                          # the full run (an idle machine: ~10 min)
    python scripts/bench_service.py --blur-requests 60 --cloak-requests 4 --memory-requests 200  # small
    python scripts/bench_service.py --donors BANK --methods replace --clients 1,4   # face replacement

Starts the service on 127.0.0.1 on a free port (a subprocess), then for blur and for cloak at 1,
4 and 16 concurrent clients sends a bounded number of requests (each cell also stops after
``--cell-seconds``) with ``samples/grace_hopper.jpg``, and reports requests/s, p50/p95 latency of
the answered requests and the answers by HTTP status. Then ``--memory-requests`` blur requests
measure the server's resident memory before and after (growth = a leak). Last, an overload
cell against a second server with a tiny queue shows the intended 503s with Retry-After, and that
clients who wait that long get through. With ``--donors BANK`` the servers hold a donor bank and
``replace`` is measured like the others (``--replace-requests`` per cell). Only loopback is
contacted; everything is bounded.
Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from _bench import REPO, machine, write_json

PHOTO = REPO / "samples" / "grace_hopper.jpg"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`facecloak serve` in a subprocess on 127.0.0.1."""

    def __init__(self, *args: str, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.temporary = Path(tempfile.mkdtemp(prefix="facecloak-bench-"))
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TMPDIR=str(self.temporary))
        env["TORCHINDUCTOR_CACHE_DIR"] = str(self.temporary.with_name(self.temporary.name + "-torch"))
        command = [
            sys.executable,
            "-c",
            "from facecloak.cli import main; main()",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *args,
        ]
        output = open(log, "ab") if log else subprocess.DEVNULL  # open as long as the server runs
        self.process = subprocess.Popen(command, env=env, stdout=output, stderr=output)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the service exited at start-up")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("the service did not start in 300 s")

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.temporary, ignore_errors=True)
        shutil.rmtree(self.temporary.with_name(self.temporary.name + "-torch"), ignore_errors=True)


MEMORY_ROUNDS = 4
"""The memory requests are sent in this many rounds, with the server's RSS after each."""


def form(method: str) -> tuple[str, dict]:
    if method == "cloak":
        return "/v1/cloak", {"level": "mid"}
    return "/v1/anonymize", {"method": method}


async def load(
    url: str, method: str, clients: int, requests: int, seconds: float, retry_503: bool = False
) -> dict:
    """``clients`` concurrent clients send ``requests`` in all (or until ``seconds`` pass)."""
    photo = PHOTO.read_bytes()
    path, fields = form(method)
    latencies: list[float] = []
    statuses: Counter = Counter()
    retries = 0
    sent = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal sent, retries
        while sent < requests and time.monotonic() < deadline:
            sent += 1
            started = time.perf_counter()
            while True:
                try:
                    answer = await session.post(
                        path, files={"image": ("grace_hopper.jpg", photo, "image/jpeg")}, data=fields
                    )
                    status = answer.status_code
                except httpx.HTTPError as error:
                    status = type(error).__name__
                if retry_503 and status == 503 and time.monotonic() < deadline:
                    retries += 1
                    statuses["503 (then retried)"] += 1
                    await asyncio.sleep(float(answer.headers.get("retry-after", "1")))
                    continue
                break
            statuses[str(status)] += 1
            if status == 200:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def quantile(q: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None

    return {
        "method": method,
        "clients": clients,
        "requests": sent,
        "ok": len(latencies),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 2) if elapsed else None,
        "p50_s": quantile(0.5),
        "p95_s": quantile(0.95),
        "mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "answers": dict(statuses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels")
    parser.add_argument(
        "--methods",
        default="blur,cloak",
        help="what to measure (blur, cloak, replace with --donors; none: only memory and overload)",
    )
    parser.add_argument("--donors", default=None, help="donor bank for replace (`facecloak serve --donors`)")
    parser.add_argument("--replace-requests", type=int, default=16, help="replace requests per cell")
    parser.add_argument("--blur-requests", type=int, default=300, help="blur requests per cell")
    parser.add_argument("--cloak-requests", type=int, default=32, help="cloak requests per cell")
    parser.add_argument("--cell-seconds", type=float, default=120, help="stop a cell after this long")
    parser.add_argument(
        "--memory-requests", type=int, default=1000, help="blur requests for the memory figure"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "service.json")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    device = ["--device", args.device] if args.device else []
    if args.donors:
        device += ["--donors", args.donors]
    elif "replace" in args.methods.split(","):
        parser.error("replace needs --donors BANK")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    server_log = args.out.with_suffix(".server.log")  # the servers' own log (warnings and errors only)
    server = Server(*device, log=server_log)
    results: dict = {"machine": machine(), "photo": PHOTO.name, "cells": []}
    try:
        asyncio.run(load(server.url, "blur", 2, 4, 60))  # warm-up
        requests_per_cell = {
            "blur": args.blur_requests,
            "cloak": args.cloak_requests,
            "replace": args.replace_requests,
        }
        for method in [m for m in args.methods.split(",") if m in requests_per_cell]:
            requests = requests_per_cell[method]
            for count in clients:
                cell = asyncio.run(load(server.url, method, count, requests, args.cell_seconds))
                results["cells"].append(cell)
                print(
                    f"{method:7} {count:3} clients: {cell['requests_per_s']} req/s, p50 {cell['p50_s']} s, "
                    f"p95 {cell['p95_s']} s, answers {cell['answers']}",
                    flush=True,
                )
        # Memory in rounds: a leak grows every round; allocator warm-up (arenas, caches) only the first.
        rounds, answers = [server.rss_mb()], Counter()
        for _ in range(MEMORY_ROUNDS):
            memory = asyncio.run(load(server.url, "blur", 8, args.memory_requests // MEMORY_ROUNDS, 3600))
            answers.update(memory["answers"])
            rounds.append(server.rss_mb())
        results["memory"] = {
            "requests": args.memory_requests // MEMORY_ROUNDS * MEMORY_ROUNDS,
            "answers": dict(answers),
            "rss_mb_before_and_after_each_round": [round(value, 1) for value in rounds],
            "rss_before_mb": round(rounds[0], 1),
            "rss_after_mb": round(rounds[-1], 1),
            "growth_mb": round(rounds[-1] - rounds[0], 1),
            "growth_after_first_round_mb": round(rounds[-1] - rounds[1], 1),
        }
        results["temporary_files_left"] = sum(path.is_file() for path in server.temporary.rglob("*"))
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        results["metrics_sample"] = [
            line for line in metrics.splitlines() if line.startswith("facecloak_batch_images_")
        ]
    finally:
        server.stop()

    overloaded = Server(*device, "--queue-size", "4", "--max-batch", "2", log=server_log)
    try:
        results["overload_queue_4"] = asyncio.run(load(overloaded.url, "blur", 16, 64, args.cell_seconds))
        results["overload_queue_4_with_retry"] = asyncio.run(
            load(overloaded.url, "blur", 16, 64, args.cell_seconds, retry_503=True)
        )
    finally:
        overloaded.stop()

    print(f"\n{'method':8}{'clients':>8}{'req/s':>9}{'p50 s':>9}{'p95 s':>9}  answers")
    for cell in results["cells"]:
        print(
            f"{cell['method']:8}{cell['clients']:>8}{cell['requests_per_s']!s:>9}{cell['p50_s']!s:>9}"
            f"{cell['p95_s']!s:>9}  {cell['answers']}"
        )
    print(f"memory: {results['memory']}")
    print(
        f"overload (queue 4, 16 clients): {results['overload_queue_4']['answers']}; "
        f"with Retry-After honoured: {results['overload_queue_4_with_retry']['answers']}"
    )
    write_json(args.out, results)


if __name__ == "__main__":
    main()
