"""The `ssd` op: the reference scan against an explicit naive formula, the `chunked` backend against
the reference (float64, 1e-10) over awkward lengths, chunk sizes, groups, initial / final states and
segments, and float64 gradcheck of `chunked`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import BackendError
from kernels.packing import seq_idx_from_cu_seqlens, seq_idx_from_padding
from kernels.ssd import ssd
from tests.tolerances import CHECKS

TOL = dict(atol=4e-14, rtol=4e-14)  # float64: about 10x the largest difference these checks show


def make_inputs(Bt, T, H, P, G, N, dtype=torch.float64, seed=0, dt_shift=-1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bt, T, H, P, generator=g, dtype=torch.float64)
    dt = F.softplus(torch.randn(Bt, T, H, generator=g, dtype=torch.float64) + dt_shift)
    A = -torch.exp(torch.randn(H, generator=g, dtype=torch.float64) * 0.5)
    B = torch.randn(Bt, T, G, N, generator=g, dtype=torch.float64)
    C = torch.randn(Bt, T, G, N, generator=g, dtype=torch.float64)
    h0 = torch.randn(Bt, H, P, N, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, dt, A, B, C, h0)]


def naive_ssd(x, dt, A, B, C, initial_state=None, seq_idx=None):
    """The closed form, one output element at a time:
    y_t = sum_{s <= t, same run} (C_t . B_s) exp(A (dt_{s+1} + ... + dt_t)) dt_s x_s
          + [no segment change in 1..t] C_t . h0 exp(A (dt_0 + ... + dt_t))."""
    Bt, T, H, P = x.shape
    r = H // B.shape[2]
    y = torch.zeros_like(x)
    for b in range(Bt):
        ids = seq_idx[b].tolist() if seq_idx is not None else [0] * T
        for h in range(H):
            g = h // r
            for t in range(T):
                for s in range(t + 1):
                    if any(ids[k] != ids[k - 1] for k in range(s + 1, t + 1)):
                        continue
                    decay = torch.exp(A[h] * dt[b, s + 1:t + 1, h].sum())
                    y[b, t, h] += (C[b, t, g] @ B[b, s, g]) * decay * dt[b, s, h] * x[b, s, h]
                if initial_state is not None and all(ids[k] == ids[0] for k in range(1, t + 1)):
                    y[b, t, h] += initial_state[b, h] @ C[b, t, g] * torch.exp(A[h] * dt[b, :t + 1, h].sum())
    return y


def random_segments(Bt, T, seed):
    """Contiguous segment ids per row with random boundaries (some segments of length 1)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(Bt, T, generator=g) < 0.25
    starts[:, 0] = False
    return starts.long().cumsum(dim=1)


@pytest.mark.parametrize("with_init,with_seq", [(False, False), (True, False), (False, True), (True, True)])
def test_reference_matches_naive_formula(with_init, with_seq):
    x, dt, A, B, C, h0 = make_inputs(2, 9, 4, 3, 2, 5, seed=1)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 6, 6, 6, 6, 6, 6, 7, 7]]) if with_seq else None
    init = h0 if with_init else None
    want = naive_ssd(x, dt, A, B, C, init, seq_idx)
    got = ssd(x, dt, A, B, C, initial_state=init, seq_idx=seq_idx, backend="reference")
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("T", [1, 5, 13, 32, 41])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_chunked_matches_reference(T, chunk_size, G):
    x, dt, A, B, C, h0 = make_inputs(2, T, 4, 3, G, 5, seed=T + 100 * G)
    seq_idx = random_segments(2, T, seed=T)
    for init in (None, h0):
        for seq in (None, seq_idx):
            kw = dict(initial_state=init, seq_idx=seq, chunk_size=chunk_size, return_final_state=True)
            y, h = ssd(x, dt, A, B, C, backend="chunked", **kw)
            y_ref, h_ref = ssd(x, dt, A, B, C, backend="reference", **kw)
            torch.testing.assert_close(y, y_ref, **TOL)
            torch.testing.assert_close(h, h_ref, **TOL)


@pytest.mark.parametrize("chunk_size", [1, 4, 8])
def test_chunked_segments_at_and_across_chunk_boundaries(chunk_size):
    """Packed documents with changes on chunk boundaries, inside chunks, length-1 documents, and
    left padding (ids -1 then 0)."""
    x, dt, A, B, C, h0 = make_inputs(3, 24, 2, 4, 1, 3, seed=3)
    packed = seq_idx_from_cu_seqlens(torch.tensor([0, 8, 9, 16, 17, 18, 24]))[0]
    seq_idx = torch.stack([packed, seq_idx_from_padding(torch.tensor([13]), 24)[0], torch.arange(24)])
    kw = dict(initial_state=h0, seq_idx=seq_idx, chunk_size=chunk_size, return_final_state=True)
    for got, want in zip(ssd(x, dt, A, B, C, backend="chunked", **kw), ssd(x, dt, A, B, C, backend="reference", **kw)):
        torch.testing.assert_close(got, want, **TOL)


def test_chunked_segment_reset_equals_separate_calls():
    """A segment change drops everything before it: the second document alone gives the same output."""
    x, dt, A, B, C, h0 = make_inputs(1, 20, 2, 4, 1, 3, seed=4)
    seq_idx = torch.tensor([[0] * 7 + [1] * 13])
    y = ssd(x, dt, A, B, C, initial_state=h0, seq_idx=seq_idx, chunk_size=4, backend="chunked")
    y2 = ssd(x[:, 7:], dt[:, 7:], A, B[:, 7:], C[:, 7:], chunk_size=4, backend="chunked")
    torch.testing.assert_close(y[:, 7:], y2, **TOL)


def test_chunked_gradients_match_reference_with_segments():
    x, dt, A, B, C, h0 = make_inputs(2, 19, 4, 3, 2, 5, seed=5)
    seq_idx = random_segments(2, 19, seed=6)
    inputs = [x, dt, A, B, C, h0]
    grads = {}
    for backend in ("chunked", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        y, h = ssd(*leaves[:5], initial_state=leaves[5], seq_idx=seq_idx, chunk_size=4,
                   return_final_state=True, backend=backend)
        g = torch.Generator().manual_seed(0)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
        grads[backend] = torch.autograd.grad(loss, leaves)
    for got, want in zip(grads["chunked"], grads["reference"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL)


def test_chunked_gradcheck():
    x, dt, A, B, C, h0 = make_inputs(1, 7, 2, 2, 1, 3, seed=7)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 1, 2]])

    def fn(*args):
        return ssd(*args[:5], initial_state=args[5], seq_idx=seq_idx, chunk_size=3, return_final_state=True,
                   backend="chunked")

    leaves = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, h0)]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def long_sequence_run(dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """chunked in `dtype` on a long sequence with strong decay and segments, from float64 inputs rounded to
    `dtype`: (output, its leaf inputs, the float64 reference's output from the unrounded inputs)."""
    x, dt, A, B, C, h0 = make_inputs(1, 300, 2, 4, 1, 8, seed=8, dt_shift=2.0)
    seq_idx = random_segments(1, 300, seed=9)
    want = ssd(x, dt, A, B, C, seq_idx=seq_idx, chunk_size=64, backend="reference")
    low = [t.to(dtype).requires_grad_(True) for t in (x, dt, A, B, C)]
    return ssd(*low, seq_idx=seq_idx, chunk_size=64, backend="chunked"), low, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_half_and_single_precision_are_stable(dtype):
    """Long sequence with strong decay: no overflow / NaN, close to the float64 result."""
    got, low, want = long_sequence_run(dtype)
    assert got.dtype == dtype
    got.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in low)
    scale = want.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got.double() / scale, want / scale, atol=CHECKS["ssd.long_sequence"][dtype], rtol=0)


def test_chunked_rejects_bad_chunk_size():
    x, dt, A, B, C, _ = make_inputs(1, 4, 2, 2, 1, 2)
    with pytest.raises(BackendError, match="chunk_size"):
        ssd(x, dt, A, B, C, chunk_size=0, backend="chunked")
