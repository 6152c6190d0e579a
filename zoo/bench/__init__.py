"""Benchmarks run by tools/bench.py: one module per benchmark (add_arguments, run); shared helpers here."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings of CUDA calls are meaningless without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
