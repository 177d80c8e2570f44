"""Where tensors run: the caller's choice, else CUDA when present, else the CPU."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given and usable here, else CUDA when present, else CPU.

    Raises:
        InvalidInputError: ``device`` is not a torch device, or a CUDA device this machine does
            not have (``--device cuda`` without a GPU failed deep in torch, with its traceback).
    """
    from facecloak.errors import InvalidInputError

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInputError(
            f"device {str(device)!r} is not a torch device (cpu, cuda, cuda:0...)"
        ) from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {str(device)!r}: no CUDA GPU is available here (--device cpu)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    elif chosen.type != "cpu":  # mps, xpu...: torch's own error came from deep inside a model's build
        try:
            torch.empty(0, device=chosen)
        except (RuntimeError, AssertionError) as error:
            detail = (str(error).splitlines() or [""])[0][:160]
            raise InvalidInputError(f"device {str(device)!r} cannot be used here ({detail})") from None
    return chosen


def cloak_batch_size(device: str | torch.device | None = None) -> int:
    """Photos per cloak optimisation on ``device`` (`default_device`'s choice when None).

    `facecloak.defaults.CPU_CLOAK_BATCH` on the CPU; on a GPU up to `GPU_CLOAK_BATCH`, cut to its
    free memory over `GPU_BYTES_PER_PHOTO`.
    """
    from facecloak.defaults import CPU_CLOAK_BATCH, GPU_BYTES_PER_PHOTO, GPU_CLOAK_BATCH

    chosen = default_device(device)
    if chosen.type != "cuda":
        return CPU_CLOAK_BATCH
    free, _total = torch.cuda.mem_get_info(chosen)
    return max(CPU_CLOAK_BATCH, min(GPU_CLOAK_BATCH, free // GPU_BYTES_PER_PHOTO))


def compute_workers(device: str | torch.device | None = None) -> int:
    """Chunks a batch protects at once on ``device``.

    One on a GPU (one chunk fills it); on a CPU `facecloak.defaults.CPU_COMPUTE_WORKERS`, at most
    one per intra-op thread.
    """
    from facecloak.defaults import CPU_COMPUTE_WORKERS

    if default_device(device).type == "cuda":
        return 1
    return max(1, min(CPU_COMPUTE_WORKERS, torch.get_num_threads()))


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), as oneDNN reports.

    Without it torch emulates bfloat16 on the CPU, slower than float32, so the cloak's default
    precision on the CPU (`facecloak.cloak.base.cpu_precision`) turns on this answer.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: assume emulation
        return False


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed: a GPU's, or the CPU allocator's.

    torch raises `torch.OutOfMemoryError` for a GPU, but a plain RuntimeError when the CPU
    allocator is refused (``DefaultCPUAllocator: can't allocate memory``).
    """
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def in_parts_that_fit(
    items: Sequence[T], work: Callable[[Sequence[T]], None], too_large: Callable[[T, str], None]
) -> None:
    """``work(items)``; when it runs out of memory, ``work`` on each half in turn, down to one item.

    A chunk of photos is protected in one call for speed, and one call for 8 (or, on a GPU, up to
    512) large photos can run out of memory where each photo alone fits: the whole chunk then
    failed, or the whole batch stopped. An item that runs out of memory alone goes to
    ``too_large(item, detail)`` (``detail``: the allocator's message, one line) and the rest go on.
    Any other error propagates.
    """
    try:
        work(items)
        return
    except Exception as error:  # only memory errors are handled here; the rest go on up
        if not is_out_of_memory(error):
            raise
        detail = (str(error).splitlines() or [type(error).__name__])[0][:200]
    # out of the handler: the failed call's frames, and the tensors they held, are freed by now
    release_cached_memory()
    if len(items) == 1:
        too_large(items[0], detail)
        return
    half = (len(items) + 1) // 2
    in_parts_that_fit(items[:half], work, too_large)
    in_parts_that_fit(items[half:], work, too_large)


def release_cached_memory() -> None:
    """Hand the GPU's cached blocks back, so a retry after an out-of-memory error has them."""
    gc.collect()  # tensors kept only by reference cycles of the failed call
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
