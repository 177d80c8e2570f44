"""Host memory: keep freed tensor memory in the process instead of handing it back to the system.

glibc's malloc gives blocks it considers large back to the kernel when they are freed (``mmap``
above a threshold that adapts, and trimming of the heap's free top). Detection and the cloak
allocate and free the same few megabytes of activations for every batch, so each batch page-faults
them in again: 744 minor page faults per 250 px photo in batched MTCNN, about a tenth of its time
on the 2-core machine (`tune_allocator`). The command line, the service and the distributed
workers call `tune_allocator` once at start; a program using the Python API may call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

MMAP_THRESHOLD_BYTES = 32 << 20
"""Blocks this large or larger are still mapped apart and returned when freed (a 12 MP photo's
float copy, 144 MB); smaller ones come from the heap and are reused."""

TRIM_THRESHOLD_BYTES = 128 << 20
"""Free memory at the heap's top kept for reuse, at most; beyond it, the excess goes back."""

SERVICE_ARENAS = 2
"""malloc arenas a long-running service uses (`limit_arenas`)."""

SERVICE_KERNEL_CACHE = 256
"""Compiled convolution kernels a long-running service keeps (`limit_compiled_kernels`)."""

ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
"""The environment variable oneDNN (torch's CPU convolutions) reads its kernel cache's size from."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
"""``mallopt`` parameter numbers (glibc's malloc.h)."""


def is_glibc() -> bool:
    """Whether this process runs on glibc (asked of the C library: no scan of the executable)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not POSIX, or not glibc
        return False


@functools.cache
def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds (`MMAP_THRESHOLD_BYTES`, `TRIM_THRESHOLD_BYTES`).

    `scripts/bench_detect.py` (96 LFW photos, batches of 8): 744-803 minor page faults and
    19.6-19.9 ms per photo on one thread with the defaults, 0-15 faults and 17.2-18.0 ms with these
    (two threads: 12.2-13.3 -> 10.7-10.8 ms). Process-wide and idempotent; a no-op (False) where
    the C library is not glibc (macOS, musl, Windows).
    """
    done = _set_malloc_option(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return _set_malloc_option(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) and done


def limit_arenas(count: int = SERVICE_ARENAS) -> bool:
    """Let at most ``count`` malloc arenas serve every thread from now on; False if not glibc.

    glibc gives threads arenas of their own (up to 8 per core), each a chain of 64 MB heaps. A
    heap's free top is handed back only when it exceeds the trim threshold (`tune_allocator`:
    128 MB, more than a heap holds) and ``malloc_trim`` leaves the tops of all but the main arena
    alone, so in a service whose HTTP threads and model worker allocate and free photos all day
    each arena's resident memory only ever grew: `facecloak serve` (8 clients, blur on LFW)
    went from 766 to 1,697 MB over 6,000 requests while the memory malloc had in use stayed at
    about 160-500 MB. With two arenas and `release_free_memory` every 30 s, the same work in one
    process stays at 750 MB (README, "Service"). Call it before the threads start.
    """
    return _set_malloc_option(_M_ARENA_MAX, count)


def limit_compiled_kernels(count: int = SERVICE_KERNEL_CACHE) -> bool:
    """Keep at most ``count`` compiled convolution kernels, unless the user set oneDNN's own limit.

    On a CPU torch runs a convolution through oneDNN, which compiles machine code for every input
    shape it meets and keeps up to 1,024 such kernels (about 256 KB each, mapped apart from malloc).
    MTCNN's pyramid gives every photo size and batch size shapes of their own, so a service fed
    photos of every size filled the cache: detecting 120 LFW photos resized to 40 sizes left
    274 MB of compiled code resident; with 256 kernels, 69 MB, for about 8% more detection time in
    that stream (kernels for sizes seen again are compiled again). Takes effect only before the
    process's first convolution, when oneDNN reads it; returns False if the variable was already set.
    """
    if ONEDNN_CACHE_VARIABLE in os.environ:
        return False
    os.environ[ONEDNN_CACHE_VARIABLE] = str(int(count))
    return True


def release_free_memory() -> bool:
    """Hand back to the system the free memory glibc's arenas hold (``malloc_trim``); False if not glibc.

    `tune_allocator` keeps freed blocks for a batch's next chunk; a long-running service hands
    them back now and then instead (every `facecloak.service.app.RELEASE_MEMORY_EVERY_S`, with
    `limit_arenas`): after 6,000 requests `malloc_trim` handed back 427 MB of `facecloak serve`'s
    1,697 at once.
    """
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def _set_malloc_option(option: int, value: int) -> bool:
    """Set ``mallopt(option, value)``; False where glibc refused it, or where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    set_option = libc.mallopt
    set_option.argtypes, set_option.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return set_option(option, value) == 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (whose ``mallopt`` and ``malloc_trim`` these call), else None."""
    if not is_glibc():
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
