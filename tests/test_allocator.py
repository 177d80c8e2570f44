"""The allocator setting: freed batch memory is reused, not page-faulted in again."""

from __future__ import annotations

import resource

import pytest
import torch

from facecloak import tune_allocator
from facecloak._allocator import is_glibc

pytestmark = pytest.mark.skipif(not is_glibc(), reason="glibc's mallopt only")


def _faults_of_batches(batches: int, tensors: int, megabytes: int) -> int:
    """Minor page faults of ``batches`` rounds of allocating, writing and freeing ``tensors`` tensors."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(batches):
        held = [torch.empty(megabytes << 18).fill_(1.0) for _ in range(tensors)]  # floats: 4 bytes
        del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_tuned_allocator_reuses_freed_batches_without_page_faults():
    assert tune_allocator() is True
    assert tune_allocator() is True  # idempotent
    _faults_of_batches(3, 8, 4)  # the heap grows to hold a batch once
    pages = 8 * (4 << 20) // resource.getpagesize()  # one batch's worth: what glibc's defaults fault again
    # eight 4 MB tensors (32 MB, over the default trim threshold once the first has been freed)
    # freed together: with the defaults the heap's top is given back and every batch faults again
    assert _faults_of_batches(5, 8, 4) < pages // 10


def test_blocks_past_the_mmap_threshold_are_still_returned():
    tune_allocator()
    large = 64  # MB, over MMAP_THRESHOLD_BYTES: a 12 MP photo's float copy must not stay resident
    faults = _faults_of_batches(3, 1, large)
    assert faults >= 3 * (large << 20) // resource.getpagesize() // 2


def _run_script(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Standard output of ``script`` run by a fresh Python (process-wide settings stay there)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    return run.stdout


_HELD_IN_A_THREAD_S_ARENA = r"""
import threading
from facecloak._allocator import release_free_memory, tune_allocator

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024

tune_allocator()
held = []
def allocate():  # a thread's own arena, as an HTTP thread of the service has
    blocks = [bytearray(256 << 10) for _ in range(1200)]  # 300 MB in blocks under the mmap threshold
    held.append(blocks[-1])  # the last one stays: the arena's top is not free, so nothing is trimmed
    del blocks
thread = threading.Thread(target=allocate)
thread.start()
thread.join()
before = rss_mb()
assert release_free_memory()
print(before, rss_mb())
"""


def test_release_free_memory_hands_back_what_a_thread_s_arena_kept():
    """With the tuned trim threshold a thread's arena kept its peak for good: the service grew."""
    before, after = (int(value) for value in _run_script(_HELD_IN_A_THREAD_S_ARENA).split())
    assert before - after > 200, (before, after)  # of the 300 MB freed


_ARENAS_OF_EIGHT_THREADS = r"""
import sys
import threading
from facecloak._allocator import limit_arenas

if sys.argv[1] == "limit":
    assert limit_arenas(2)
barrier, held = threading.Barrier(8), []

def allocate():  # eight threads alive at once, each allocating: each would get an arena of its own
    barrier.wait()
    held.append([bytearray(64 << 10) for _ in range(16)])
    barrier.wait()

threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
heaps = 0  # a thread arena is a chain of 64 MB-aligned anonymous heaps
for line in open("/proc/self/maps"):
    fields = line.split()
    if len(fields) == 5 and fields[1] == "rw-p" and int(fields[0].split("-")[0], 16) % (64 << 20) == 0:
        heaps += 1
print(heaps)
"""


def test_limit_arenas_keeps_a_service_s_threads_to_two_arenas():
    """Each thread's own arena kept its peak: a service's resident memory only grew (README, "Service")."""

    def heaps(mode: str) -> int:
        return int(_run_script(_ARENAS_OF_EIGHT_THREADS, mode))

    assert heaps("limit") <= 1  # the main arena, and one more
    assert heaps("default") >= 4


_DETECT_AT_MANY_SIZES = r"""
import os
import sys

import torch
import torch.nn.functional as F

from facecloak._allocator import ONEDNN_CACHE_VARIABLE, limit_compiled_kernels
from facecloak.detect import FaceDetector
from facecloak.io import read_image

os.environ.pop(ONEDNN_CACHE_VARIABLE, None)
if sys.argv[1] == "limit":
    assert limit_compiled_kernels(64)
    assert not limit_compiled_kernels(32)  # set already: the user's (or the first) value stays
photo = read_image(sys.argv[2]).pixels
detector = FaceDetector(device="cpu", rotations="none")
for side in range(250, 490, 16):  # fifteen photo sizes, as a service receives them
    detector([F.interpolate(photo[None], size=(side, side + 40), mode="bilinear")[0]])
compiled = 0  # anonymous executable mappings: the kernels oneDNN compiled
for line in open("/proc/self/maps"):
    fields = line.split()
    if len(fields) == 5 and "x" in fields[1]:
        start, end = (int(value, 16) for value in fields[0].split("-"))
        compiled += end - start
print(compiled >> 20)
"""


def test_limit_compiled_kernels_bounds_what_photos_of_every_size_compile(samples_dir):
    """oneDNN compiled and kept a kernel per photo size: a service fed every size kept 274 MB of them."""
    import os

    from facecloak._allocator import ONEDNN_CACHE_VARIABLE

    environment = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE_VARIABLE}
    photo = str(samples_dir / "astronaut.jpg")

    def compiled_mb(mode: str) -> int:
        return int(_run_script(_DETECT_AT_MANY_SIZES, mode, photo, env=environment))

    limited, default = compiled_mb("limit"), compiled_mb("default")
    assert limited <= 24  # 64 kernels of about 256 KB (16 MB here)
    assert default >= 2.5 * limited  # 60 MB here
