"""Triton backends beyond the conformance suite: awkward shapes, several row groups, and who may
select them (CPU tensors only in the interpreter, and only when pinned).

Runs in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1); shapes stay tiny.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kernels
import kernels.feedback_solve.triton as fb_triton
from kernels.triton_tril import inverse_kernel
from kernels.attention import attention
from kernels.feedback_solve import feedback_solve
from kernels.ssd import ssd
from kernels.triton_utils import INTERPRET, triton
from tests.tolerances import tolerance

pytestmark = pytest.mark.skipif(triton is None or not INTERPRET, reason="needs triton and TRITON_INTERPRET=1")


def _segments(lengths, B):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids[None].expand(B, -1).contiguous()


def _check_against_reference(op, args, kwargs):
    """Forward and every float input's gradient of backend 'triton' vs 'reference' (float32), to the
    conformance suite's tolerance for the Triton interpreter."""
    def run(backend):
        a = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in args]
        kw = {k: v.detach().clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
              for k, v in kwargs.items()}
        out = op(*a, backend=backend, **kw)
        outs = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
        leaves = [t for t in (*a, *kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
        return outs, torch.autograd.grad(loss, leaves, allow_unused=True)

    got, got_grads = run("triton")
    want, want_grads = run("reference")
    for name, g, w in [*(("output", g, w) for g, w in zip(got, want)),
                       *((f"grad {i}", g, w) for i, (g, w) in enumerate(zip(got_grads, want_grads)))]:
        if w is None:  # the input does not reach the reference's output: zero (or no) gradient
            assert g is None or not g.any(), f"{name}: nonzero where the reference has none"
            continue
        scale = w.abs().max().clamp_min(1.0)
        torch.testing.assert_close(g / scale, w / scale, msg=lambda m: f"{name}: {m}",
                                   **tolerance(op.name, torch.float32, "triton"))


# ---------------------------------------------------------------- feedback_solve
@pytest.mark.parametrize("P,packed", [(0, None), (5, [10, 20, 12])], ids=["plain", "past-packed"])
def test_feedback_several_groups(monkeypatch, P, packed):
    """Rows solved in several groups of one block each (the cross-group GEMMs and the transposed
    solve's hand-over between groups), T not a multiple of the block, Dk != D."""
    monkeypatch.setattr(fb_triton, "GROUP_ROWS", fb_triton.BT)
    torch.manual_seed(0)
    B, T, D, Dk = 2, 37, 20, 24
    gamma = torch.where(torch.rand(B, T) < 0.5, -0.99, 0.99)
    kw = {}
    if P:
        kw.update(past_k=torch.randn(B, P, Dk), past_s=torch.randn(B, P, D))
    if packed:
        kw["seq_idx"] = _segments(packed, B)
    _check_against_reference(feedback_solve, (torch.randn(B, T, D), torch.randn(B, T, Dk), torch.randn(B, T, Dk), gamma), kw)


def test_feedback_buffer_budget_sets_group_rows(monkeypatch):
    monkeypatch.setattr(fb_triton, "BUFFER_BYTES", 4 * 3 * fb_triton.BT * 1000)
    assert fb_triton._group_rows(B=3, L=1000) == fb_triton.BT
    assert fb_triton._group_rows(B=1, L=1000) == 3 * fb_triton.BT
    monkeypatch.setattr(fb_triton, "BUFFER_BYTES", 1)
    assert fb_triton._group_rows(B=1, L=10**6) == fb_triton.BT  # never below one block


# ---------------------------------------------------------------- attention
def test_attention_gqa_window_segments_decoding():
    """One kv head for four query heads, queries the last 40 of 45 keys, a window, segments, d != dv."""
    torch.manual_seed(0)
    B, Tq, S = 1, 40, 45
    q, k, v = torch.randn(B, Tq, 4, 20), torch.randn(B, S, 1, 20), torch.randn(B, S, 1, 24)
    _check_against_reference(attention, (q, k, v), dict(window=9, seq_idx=_segments([10, 30, 5], B), scale=0.3))


def test_attention_strided_inputs():
    """q, k, v as slices of one packed projection (non-contiguous heads)."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 17, 3, 2, 32)
    _check_against_reference(attention, (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]), {})


# ---------------------------------------------------------------- ssd
def test_ssd_awkward_dims_init_segments():
    """P, N not powers of two, groups, an initial state, segments crossing chunk borders, final state."""
    torch.manual_seed(0)
    B, T, H, P, G, N = 2, 37, 4, 24, 2, 20
    dt = torch.nn.functional.softplus(torch.randn(B, T, H) - 1)
    A = -torch.exp(torch.randn(H) * 0.5)
    args = (torch.randn(B, T, H, P), dt, A, torch.randn(B, T, G, N), torch.randn(B, T, G, N))
    kw = dict(initial_state=torch.randn(B, H, P, N), seq_idx=_segments([16, 1, 3, 17], B), return_final_state=True)
    _check_against_reference(ssd, args, kw)


# ---------------------------------------------------------------- who may run them
def _inputs():
    x = torch.randn(1, 5, 2, 16)
    return {
        "attention": ((x, x, x), {}),
        "feedback_solve": ((torch.randn(1, 5, 16), torch.randn(1, 5, 16), torch.randn(1, 5, 16), torch.rand(1, 5)), {}),
        "ssd": ((x, torch.rand(1, 5, 2), -torch.rand(2), torch.randn(1, 5, 1, 16), torch.randn(1, 5, 1, 16)), {}),
    }


@pytest.mark.parametrize("op_name", ["attention", "feedback_solve", "ssd"])
def test_cpu_tensors_run_only_when_pinned(op_name):
    op = kernels.get_op(op_name)
    args, kw = _inputs()[op_name]
    assert op.backends["triton"].reason(*args, **kw) is None  # pinned: runs in the interpreter
    assert "pin backend='triton'" in op.backends["triton"].auto_reason(*args, **kw)
    assert op.select(*args, **kw).name != "triton"
    assert op.select(*args, backend="triton", **kw).name == "triton"
    with kernels.use_backends(**{op_name: "triton"}):
        assert op.select(*args, **kw).name == "triton"


@pytest.mark.parametrize("op_name", ["attention", "feedback_solve", "ssd"])
def test_float64_declined_with_reason(op_name):
    op = kernels.get_op(op_name)
    args, kw = _inputs()[op_name]
    args = tuple(a.double() for a in args)
    assert "float64 not supported" in op.backends["triton"].reason(*args, **kw)


def test_head_dim_limits_declined():
    q = torch.randn(1, 2, 1, 300)
    assert "head dim > 256" in attention.backends["triton"].reason(q, q, q)
    x = torch.randn(1, 2, 1, 130)
    B = torch.randn(1, 2, 1, 16)
    assert "head dim P > 128" in ssd.backends["triton"].reason(x, torch.rand(1, 2, 1), -torch.rand(1), B, B)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_user_without_interpreter_never_gets_triton():
    """A fresh process without TRITON_INTERPRET: every Triton backend reports 'needs CUDA'."""
    code = (
        "import torch, kernels\n"
        "x = torch.randn(1, 3, 1, 16)\n"
        "for name in ('attention', 'feedback_solve', 'ssd'):\n"
        "    print(name, kernels.get_op(name).backends['triton'].unavailable_reason())\n"
        "print('auto', kernels.get_op('attention').select(x, x, x).name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    for line in lines[:3]:
        assert "needs CUDA" in line, line
    assert lines[3] != "auto triton"


def test_decoding_shapes_not_auto_selected():
    """One new row after a cache (feedback) and one query (attention): skipped automatically, runnable pinned."""
    f, q = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    kw = dict(past_k=torch.randn(1, 4, 16), past_s=torch.randn(1, 4, 16))
    assert "decoding step" in feedback_solve.backends["triton"].auto_reason(f, q, q, torch.rand(1, 1), **kw)
    qa, ka = torch.randn(1, 1, 2, 16), torch.randn(1, 5, 2, 16)
    assert "decoding query" in attention.backends["triton"].auto_reason(qa, ka, ka)
    _check_against_reference(feedback_solve, (f, q, q, torch.rand(1, 1)), kw)
    _check_against_reference(attention, (qa, ka, ka), {})


# ---------------------------------------------------------------- fixes from compiling for sm_90
def test_inverse_kernel_from_16x16_pieces():
    """The 64 x 64 diagonal inverses (built from 16 x 16 pieces on the GPU) equal (I - N)^-1, with
    rows past the end masked; run at BT = 64 and 16 in the interpreter."""
    torch.manual_seed(0)
    for BT in (16, 64):
        B, n, col0 = 2, 2 * BT - 5, 7
        W = torch.randn(B, n, 300) * 0.3
        inv = torch.full((B, 3, BT, BT), float("nan"))
        inverse_kernel[(2, B)](W, inv, 1, 3, n, col0, W.stride(0), W.stride(1), BT=BT)
        for b in range(B):
            for i in range(2):
                r = torch.arange(i * BT, (i + 1) * BT)
                ok = r < n
                rc = r.clamp(max=n - 1)
                N = torch.where(ok[:, None] & ok[None, :], W[b][rc][:, col0 + rc], 0).tril(-1)
                torch.testing.assert_close(inv[b, 1 + i], torch.linalg.inv(torch.eye(BT) - N), atol=1e-5, rtol=1e-5)


def test_feedback_buffer_cap_holds_for_large_batches(monkeypatch):
    """When even one block of rows per sequence exceeds BUFFER_BYTES, sequences are solved a few at a time."""
    B, T, D = 5, 20, 16
    monkeypatch.setattr(fb_triton, "BUFFER_BYTES", 2 * 4 * fb_triton.BT * T)  # two sequences' blocks
    batches = []
    apply = fb_triton._FeedbackSolveTriton.apply
    monkeypatch.setattr(fb_triton._FeedbackSolveTriton, "apply", lambda f, *a: batches.append(f.shape[0]) or apply(f, *a))
    torch.manual_seed(0)
    _check_against_reference(feedback_solve, (torch.randn(B, T, D), torch.randn(B, T, D), torch.randn(B, T, D),
                                              torch.rand(B, T) * 1.8 - 0.9), {})
    assert batches == [2, 2, 1]


def test_host_math_ignores_tf32_and_autocast(monkeypatch):
    """The solve's host GEMMs run in full float32 whatever torch.set_float32_matmul_precision and
    autocast say (TF32 and bf16 would be amplified by up to 1 / (1 - gamma_max))."""
    seen = []
    baddbmm = torch.baddbmm

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu")))
        return baddbmm(*args, **kwargs)

    monkeypatch.setattr(torch, "baddbmm", spy)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert torch.backends.cuda.matmul.allow_tf32
        f = torch.randn(1, 40, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feedback_solve(f, f, f, torch.rand(1, 40), past_k=f[:, :3], past_s=f[:, :3], backend="triton")
        assert torch.backends.cuda.matmul.allow_tf32  # the caller's setting is back
    finally:
        torch.set_float32_matmul_precision(saved)
    assert seen and all(flags == (False, False) for flags in seen), seen


def test_autocast_dtypes_accepted():
    """What a Mamba-2 / Sessa layer hands over under bf16 autocast: bf16 operands with float32 step
    sizes, decay rates and gains. The Triton backends take them (they fell back silently before)."""
    x, B = torch.randn(1, 20, 2, 16, dtype=torch.bfloat16), torch.randn(1, 20, 1, 16, dtype=torch.bfloat16)
    dt, A = torch.rand(1, 20, 2), -torch.rand(2)
    assert ssd.backends["triton"].reason(x, dt, A, B, B, initial_state=torch.randn(1, 2, 16, 16)) is None
    f = torch.randn(1, 20, 16, dtype=torch.bfloat16)
    assert feedback_solve.backends["triton"].reason(f, f, f, torch.rand(1, 20)) is None
    assert "share one dtype" in ssd.backends["triton"].reason(x, dt, A, B, B.float())


def test_float32_inputs_under_autocast_use_its_dtype():
    """Packed Mamba-2 input reaches ssd in float32 under autocast: the products then run in bf16, as
    torch's own matmuls would (result within bf16 tolerance of the float32 reference, not equal to it)."""
    torch.manual_seed(0)
    x, B, C = torch.randn(2, 33, 2, 16), torch.randn(2, 33, 1, 16), torch.randn(2, 33, 1, 16)
    dt, A = torch.nn.functional.softplus(torch.randn(2, 33, 2) - 1), -torch.rand(2) - 0.5
    want = ssd(x, dt, A, B, C, backend="reference")
    exact = ssd(x, dt, A, B, C, backend="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssd(x, dt, A, B, C, backend="triton")
    assert got.dtype == torch.float32
    scale = want.abs().max()
    assert (exact - want).abs().max() / scale < 1e-5
    assert 1e-5 < (got - want).abs().max() / scale < 3e-2
