"""The `chunked` feedback_solve backend against the dense `reference`: every block-boundary case,
gradients of every input, gradcheck, packing, decoding caches and linear memory."""

from __future__ import annotations

import pytest
import torch

from kernels.feedback_solve import chunked, feedback_solve
from kernels.packing import seq_idx_from_cu_seqlens, seq_idx_from_padding
from tests.tolerances import CHECKS, tolerance



def make_inputs(B, T, D, Dk, P=0, gamma_max=0.999, dtype=torch.float64, seed=0):
    """Random inputs with gains of both signs close to +-gamma_max (the stiff regime)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0)
    gamma = sign * gamma_max * (1 - 0.02 * torch.rand(B, T, generator=g, dtype=torch.float64))
    inputs = dict(f=r(B, T, D), q=r(B, T, Dk), k=r(B, T, Dk), gamma=gamma)
    if P:
        inputs.update(past_k=r(B, P, Dk), past_s=r(B, P, D))
    return {name: t.to(dtype).requires_grad_(True) for name, t in inputs.items()}


def run(backend, inputs, cotangent, seq_idx=None, **kw):
    """Output and gradients of <s, cotangent> w.r.t. every input, on fresh leaves."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()}
    args = [leaves.pop(n) for n in ("f", "q", "k", "gamma")]
    if backend == "chunked":
        s = chunked.feedback_solve_chunked(*args, **leaves, seq_idx=seq_idx, **kw)
    else:
        s = feedback_solve(*args, **leaves, seq_idx=seq_idx, backend=backend)
    tensors = args + list(leaves.values())
    grads = torch.autograd.grad((s * cotangent).sum(), tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]  # e.g. the last key
    names = ["f", "q", "k", "gamma", *leaves]
    return s.detach(), dict(zip(names, grads))


def assert_matches(inputs, seq_idx=None, dtype=torch.float64, **kw):
    torch.manual_seed(1)
    B, T, D = inputs["f"].shape
    cot = torch.randn(B, T, D, dtype=torch.float64).to(dtype)
    want, want_g = run("reference", inputs, cot, seq_idx)
    got, got_g = run("chunked", inputs, cot, seq_idx, **kw)
    assert got.dtype == want.dtype and not torch.isnan(got).any()
    for name, g, w in [("s", got, want), *((n, got_g[n], want_g[n]) for n in want_g)]:
        scale = w.abs().max().clamp_min(1.0)  # the solve amplifies by up to 1/(1-gamma_max)
        torch.testing.assert_close(g.double() / scale, w.double() / scale, msg=lambda m: f"{name}: {m}",
                                   **tolerance("feedback_solve", dtype, "chunked"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("C", [1, 4, 8, 16])
def test_block_boundaries(C, dtype):
    for T in sorted({1, 2, max(C - 1, 1), C, C + 1, 3 * C + 2}):
        for gamma_max in (0.999, 0.5):
            assert_matches(make_inputs(2, T, 12, 8, gamma_max=gamma_max, dtype=dtype, seed=T + C), dtype=dtype,
                           chunk_size=C)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_decoding_cache(dtype):
    for P, T, C in [(9, 1, 4), (9, 3, 4), (5, 11, 4), (7, 10, 16)]:
        assert_matches(make_inputs(2, T, 10, 6, P=P, dtype=dtype, seed=P * T), dtype=dtype, chunk_size=C)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_packed_and_left_padded(dtype):
    cu = torch.tensor([0, 6, 7, 15, 21, 30])
    seq = seq_idx_from_cu_seqlens(cu).expand(2, 30).contiguous()
    assert_matches(make_inputs(2, 30, 8, 8, dtype=dtype, seed=3), seq, dtype=dtype, chunk_size=4)
    pad = seq_idx_from_padding(torch.tensor([13, 4]), 13)
    assert_matches(make_inputs(2, 13, 8, 8, dtype=dtype, seed=4), pad, dtype=dtype, chunk_size=4)
    # a cache whose last segment continues into the new rows, and a new segment starting mid-block
    seq = torch.tensor([[0] * 4 + [1] * 8 + [2] * 6]).expand(2, 18).contiguous()
    assert_matches(make_inputs(2, 14, 8, 8, P=4, dtype=dtype, seed=5), seq, dtype=dtype, chunk_size=4)


def test_gradcheck():
    inputs = make_inputs(1, 7, 3, 2, P=2, gamma_max=0.9)
    seq = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1]])
    names = list(inputs)

    def fn(*xs):
        kw = dict(zip(names, xs))
        return chunked.feedback_solve_chunked(kw.pop("f"), kw.pop("q"), kw.pop("k"), kw.pop("gamma"), **kw,
                                              seq_idx=seq, chunk_size=3)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-7)


def half_precision_run(dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """chunked on `dtype` inputs: (output, the inputs, the float32 reference's output from the same inputs)."""
    inputs = make_inputs(2, 21, 8, 8, gamma_max=0.9, dtype=dtype)
    s = chunked.feedback_solve_chunked(inputs["f"], inputs["q"], inputs["k"], inputs["gamma"], chunk_size=4)
    want = feedback_solve(*(inputs[n].float() for n in ("f", "q", "k", "gamma")), backend="reference")
    return s, inputs, want


def test_half_precision_computes_in_float32():
    s, inputs, want = half_precision_run()
    assert s.dtype == torch.bfloat16
    grads = torch.autograd.grad(s.float().sum(), list(inputs.values()))
    assert all(g.dtype == torch.bfloat16 for g in grads)
    scale = want.abs().max().clamp_min(1.0)
    torch.testing.assert_close(s.double() / scale, want.double() / scale, rtol=0,
                               atol=CHECKS["feedback_solve.half_precision"][torch.bfloat16])


def test_automatic_selection():
    def chosen(T, P=0):
        x = make_inputs(1, T, 4, 4, P=P)
        return feedback_solve.select(x.pop("f"), x.pop("q"), x.pop("k"), x.pop("gamma"), **x).name
    assert chosen(chunked.AUTO_MIN_T) == chosen(3000) == chosen(200, P=5) == "chunked"
    assert chosen(chunked.AUTO_MIN_T - 1) == chosen(1, P=5) == "reference"  # where the reference is faster
    x = make_inputs(1, 1, 4, 4, P=5)
    assert feedback_solve.select(x.pop("f"), x.pop("q"), x.pop("k"), x.pop("gamma"), **x, backend="chunked").name == "chunked"


def test_default_chunk_size_is_settable():
    inputs = make_inputs(1, 10, 4, 4)
    try:
        chunked.set_chunk_size(3)
        assert chunked.get_chunk_size() == 3
        assert_matches(inputs)
    finally:
        chunked.set_chunk_size(None)
    assert chunked.get_chunk_size() == chunked.DEFAULT_CHUNK_SIZE
    with pytest.raises(ValueError, match="chunk_size"):
        chunked.set_chunk_size(0)


def saved_bytes(T, C, backend):
    """Bytes autograd keeps for backward (distinct storages) for one call at length T."""
    inputs = make_inputs(1, T, 16, 16, dtype=torch.float32)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        args = [inputs[n] for n in ("f", "q", "k", "gamma")]
        if backend == "chunked":
            chunked.feedback_solve_chunked(*args, chunk_size=C)
        else:
            feedback_solve(*args, backend=backend)
    return sum(storages.values())


def test_saved_memory_is_linear_in_T():
    small, large = saved_bytes(256, 32, "chunked"), saved_bytes(1024, 32, "chunked")
    assert large <= 4.2 * small, (small, large)  # 4x the tokens: linear, not 16x
    assert saved_bytes(1024, 32, "reference") > 10 * large  # the dense reference keeps T x T buffers
