"""Benchmarks run by tools/bench.py: one module per benchmark (add_arguments, run); shared helpers here."""

from __future__ import annotations

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
