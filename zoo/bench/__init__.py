"""Benchmarks run by tools/bench.py: one module per benchmark (add_arguments, run); shared helpers here."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings of CUDA calls are meaningless without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn(), each waited for, after one warm-up call (compilation, autotuning)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> str:
    """Let glibc's malloc reuse freed memory of any size up to 1 GiB; returns what was set, for the header.

    By default glibc serves every block of 32 MiB or more with a fresh mmap() and unmaps it when it
    is freed, so each such tensor is page-faulted and zeroed by the kernel again on every step. On CPU
    that makes a layer's time jump wherever one of its tensors crosses 32 MiB, which times the
    allocator, not the layer (README, Benchmarks). Raising the mmap and trim thresholds (as MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
    do from the environment, or a caching malloc such as jemalloc does) keeps freed blocks for reuse.
    """
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is None or not all(mallopt(p, ctypes.c_int(KEEP_BYTES)) for p in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)):
        return "system malloc (no glibc mallopt here)"
    return f"glibc malloc keeps freed blocks up to {KEEP_BYTES >> 20} MiB (mmap and trim thresholds; --system-malloc: off)"
