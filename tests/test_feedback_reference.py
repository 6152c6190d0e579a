"""The `reference` backend of feedback_solve against the recursion written as a per-token Python loop.

    s_t = f_t + gamma_t * sum_{j < t, same segment} softmax_j(<q_t, k_j> / sqrt(Dk)) s_j
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.feedback_solve import feedback_solve
from kernels.packing import seq_idx_from_cu_seqlens


def loop_solve(f, q, k, gamma, past_k=None, past_s=None, seq_idx=None):
    """One row at a time, one key at a time, in float64 (plain Python sums over the past)."""
    f, q, k, gamma = f.double(), q.double(), k.double(), gamma.double()
    B, T, D = f.shape
    P = 0 if past_k is None else past_k.shape[1]
    keys = k if past_k is None else torch.cat([past_k.double(), k], dim=1)
    out = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        outputs = [] if past_s is None else [past_s[b, j].double() for j in range(P)]
        for t in range(T):
            pos = P + t
            past = [j for j in range(pos) if seq_idx is None or seq_idx[b, j] == seq_idx[b, pos]]
            s_t = f[b, t].clone()
            if past:
                logits = [float(q[b, t] @ keys[b, j]) / math.sqrt(q.shape[-1]) for j in past]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                for j, w in zip(past, weights):
                    s_t += gamma[b, t] * (w / total) * outputs[j]
            outputs.append(s_t)
            out[b, t] = s_t
    return out


def make(B, T, D, P=0, Dk=None, dtype=torch.float64, gamma_max=0.999):
    Dk = Dk or D
    f, q, k = torch.randn(B, T, D), torch.randn(B, T, Dk), torch.randn(B, T, Dk)
    gamma = gamma_max * torch.tanh(2 * torch.randn(B, T))
    past = {} if not P else dict(past_k=torch.randn(B, P, Dk).to(dtype), past_s=torch.randn(B, P, D).to(dtype))
    return (f.to(dtype), q.to(dtype), k.to(dtype), gamma.to(dtype)), past


def check(args, kwargs, tol=5e-15):  # float64: about 10x the largest difference these checks show
    got = feedback_solve(*args, backend="reference", **kwargs)
    want = loop_solve(*args, **kwargs)
    assert got.dtype == args[0].dtype and got.shape == args[0].shape
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    return got


@pytest.mark.parametrize("B,T,D,Dk", [(2, 1, 8, None), (2, 2, 8, None), (3, 9, 16, None), (2, 17, 12, 6)])
def test_matches_loop(B, T, D, Dk):
    args, kw = make(B, T, D, Dk=Dk)
    s = check(args, kw)
    torch.testing.assert_close(s[:, 0], args[0][:, 0], atol=0, rtol=0)  # row 0 has no past: s_0 = f_0


@pytest.mark.parametrize("T,P", [(1, 1), (1, 11), (4, 7), (6, 1)])
def test_with_cache(T, P):
    args, kw = make(2, T, 8, P=P)
    check(args, kw)


def test_cache_equals_full_solve():
    """Solving the last T rows against the first P rows' outputs as a cache == one solve of P + T rows."""
    (f, q, k, gamma), _ = make(2, 12, 8)
    full = feedback_solve(f, q, k, gamma, backend="reference")
    for P in (1, 5, 11):
        tail = feedback_solve(f[:, P:], q[:, P:], k[:, P:], gamma[:, P:], past_k=k[:, :P], past_s=full[:, :P],
                              backend="reference")
        torch.testing.assert_close(tail, full[:, P:], atol=5e-15, rtol=5e-15)


@pytest.mark.parametrize("lengths", [[4, 1, 6], [1, 1, 3], [11]])
def test_packed(lengths):
    """Segments never interact, and each segment's first row is empty (s = f there)."""
    T = sum(lengths)
    seq_idx = seq_idx_from_cu_seqlens(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])).expand(2, T)
    args, _ = make(2, T, 8)
    s = check(args, dict(seq_idx=seq_idx))
    starts = [0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()]
    torch.testing.assert_close(s[:, starts], args[0][:, starts], atol=0, rtol=0)


@pytest.mark.parametrize("T", [1, 5])
def test_packed_with_cache(T):
    """The new rows continue one segment of the cache (row 0) or start a new one (row 1), with pads."""
    P = 6
    args, kw = make(2, T, 8, P=P)
    seq_idx = torch.tensor([[-1, -1, 0, 0, 0, 0] + [0] * T,
                            [-1, 0, 0, 0, 1, 1] + [2] + [3] * (T - 1)])
    s = check(args, dict(kw, seq_idx=seq_idx))
    torch.testing.assert_close(s[1, 0], args[0][1, 0], atol=0, rtol=0)  # a new segment: no past


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("P", [0, 5])
def test_half_precision_solved_in_float32(dtype, P):
    (f, q, k, gamma), kw = make(2, 9 if not P else 1, 16, P=P, dtype=dtype, gamma_max=0.99)
    got = feedback_solve(f, q, k, gamma, backend="reference", **kw)
    assert got.dtype == dtype
    single = feedback_solve(f.float(), q.float(), k.float(), gamma.float(), backend="reference",
                            **{key: v.float() for key, v in kw.items()})
    torch.testing.assert_close(got, single.to(dtype), atol=0, rtol=0)
    want = loop_solve(f, q, k, gamma, **kw)
    eps = torch.finfo(dtype).eps
    assert (got.double() - want).abs().max() <= eps * want.abs().max()  # one rounding at the end
