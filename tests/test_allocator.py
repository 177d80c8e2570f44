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
