"""Precision under autocast and the float32-matmul switches (kernels.precision).

The feedback solve amplifies rounding by up to 1 / (1 - gamma_max): its `reference` and `chunked`
backends compute in full float32 under bf16 autocast and with TF32 / oneDNN-bf16 allowed for
float32 matmuls. linear_attention and delta_rule promise float32 compute (their contracts): autocast
must not turn their matmuls into bfloat16 either. ssd follows autocast for its products, as its
Triton backend and mamba_ssm do (not tested here).
"""

from __future__ import annotations

import pytest
import torch

from kernels import OPS
from kernels.precision import exact_float32
from kernels.validation import _floats, _leafy, feedback_case, forward_backward, relative_error, state_case

CASES = {
    "feedback_solve": feedback_case("precision-T200-D32-past7", 2, 200, 32, P=7),  # gamma = +-0.99
    "linear_attention": state_case("precision-la", "linear_attention", 2, 150, 2, 16, 16, "key", init=True),
    "delta_rule": state_case("precision-dr", "delta_rule", 2, 150, 2, 16, 16, "head", init=True),
}
# float32 compute measures ~1e-6 here; bfloat16 matmuls (what autocast did before) 2e-3 - 1e-2
FLOAT32 = 2e-5


def _under_autocast(op: str, backend: str, args: tuple, kwargs: dict, backward_inside: bool):
    args, kwargs = _leafy(args, kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OPS[op](*args, backend=backend, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
        if backward_inside:
            return outs, torch.autograd.grad(loss, _floats(args, kwargs), allow_unused=True)
    return outs, torch.autograd.grad(loss, _floats(args, kwargs), allow_unused=True)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("op", list(CASES))
def test_float32_compute_under_bf16_autocast(op, backend):
    _check_float32(op, backend, backward_inside=False)


def test_feedback_chunked_backward_inside_autocast():
    """The chunked solve's own backward runs in float32 even when called inside the autocast region (the
    autograd-derived backwards of the other backends follow autocast there, as torch's ops do)."""
    _check_float32("feedback_solve", "chunked", backward_inside=True)


def _check_float32(op: str, backend: str, backward_inside: bool) -> None:
    args, kwargs = CASES[op].make(torch.float32, torch.device("cpu"))
    want, want_grads = forward_backward(op, "reference", args, kwargs, torch.float64)
    got, got_grads = _under_autocast(op, backend, args, kwargs, backward_inside)
    assert all(o.dtype == torch.float32 for o in got)
    assert max(relative_error(g, w) for g, w in zip(got, want)) < FLOAT32
    assert max(relative_error(g, w) for g, w in zip(got_grads, want_grads)) < FLOAT32


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_feedback_solve_ignores_reduced_precision_matmuls(backend, monkeypatch):
    """Inside the solve TF32 (CUDA) and oneDNN's bfloat16 float32 matmuls (CPU) are off and autocast
    is off, whatever the caller set; the caller's settings are back afterwards."""
    seen = []
    solve = torch.linalg.solve_triangular

    def spy(*args, **kwargs):
        seen.append((torch.backends.mkldnn.matmul.fp32_precision, torch.is_autocast_enabled("cpu")))
        return solve(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve_triangular", spy)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # bfloat16 inside oneDNN's float32 matmuls
    try:
        (f, q, k, gamma), kwargs = CASES["feedback_solve"].make(torch.float32, torch.device("cpu"))
        f.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s = OPS["feedback_solve"](f, q, k, gamma, backend=backend, **kwargs)
        s.sum().backward()
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # the caller's setting is back
    finally:
        torch.set_float32_matmul_precision(saved)
    forward_only = 1 if backend == "reference" else None  # autograd's backward has no triangular solve spy
    assert seen[:forward_only] and all(flags == ("ieee", False) for flags in seen[:forward_only]), seen


@pytest.mark.parametrize("api", ["old", "new"])
def test_exact_float32_restores_the_callers_tf32_setting(api):
    """CUDA's TF32 switch, set through either of torch's APIs, is off inside and restored after (the
    flags exist without a GPU)."""
    matmul = torch.backends.cuda.matmul
    saved = torch.get_float32_matmul_precision()
    try:
        if api == "old":
            torch.set_float32_matmul_precision("high")
            with exact_float32(torch.device("cuda")):
                assert matmul.allow_tf32 is False
            assert matmul.allow_tf32 is True
        else:
            matmul.fp32_precision = "tf32"
            with exact_float32(torch.device("cuda")):
                assert matmul.fp32_precision == "ieee"
            assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision(saved)
