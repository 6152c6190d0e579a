"""Shared fixtures: deterministic seeds, NaN-poisoned torch.empty, quiet logs."""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA, Triton kernels run on CPU tensors in the interpreter; with CUDA they run natively
# (the CPU cases then skip them with their reason, the gpu-marked cases run them on the GPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from zoo import gin_config  # noqa: E402  (after TRITON_INTERPRET: importing zoo imports kernels)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where device-generic tests build their inputs
NEEDS_CUDA = "needs CUDA: torch.cuda.is_available() is False here"

# one thread per xdist worker (make test runs 2 workers on 2 cores), else up to 2
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_gin():
    """Every test starts and ends with an empty gin config: a binding parsed by one test (say
    `Mamba2.head_dim = 62` from a shipped config) must never reach a later test in the same worker."""
    gin_config.clear()
    yield
    gin_config.clear()


@pytest.fixture
def nan_poison(monkeypatch):
    """Make torch.empty / empty_like / new_empty return NaN-filled floats, so any output element a
    backend forgets to write shows up as NaN instead of silently reusing old memory."""

    def poisoned(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if out.is_floating_point():
                out.fill_(float("nan"))
            return out

        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
    yield
