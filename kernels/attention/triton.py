"""`triton` backend of `attention`: flash-attention style Triton kernels, forward and backward.

Causal with the queries bottom-right aligned (query i at position S - Tq + i), grouped-query heads
(query head h reads key/value head h // (H / Hkv)), optional sliding window and segment ids
(`seq_idx`), separate head dims for q/k (d) and v (dv), each up to 256.
  forward   one program per (query block, batch x head): online softmax over the key blocks that the
            causal mask and the window leave visible; saves the row log-sum-exp.
  backward  delta = rowsum(dO * O); one program per (key block, batch x kv head) accumulates dK and
            dV over the query heads of its group (no atomics); one program per (query block, batch x
            head) accumulates dQ.
Logits and softmax in float32; half-precision operands go to the tensor cores with float32
accumulation (P is cast to v's dtype for P V, as in FlashAttention).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.attention.contract import attention, check_inputs
from kernels.triton_utils import (Reason, auto_check, autotune, check_tensors, dot_dtype, jit, mma, next_pow2, tl,
                                  triton, triton_probe)

MAX_HEAD_DIM = 256

_FWD_CONFIGS = [dict(BM=128, BN=64, num_warps=8, num_stages=3), dict(BM=64, BN=64, num_warps=4, num_stages=3),
                dict(BM=128, BN=32, num_warps=4, num_stages=3), dict(BM=64, BN=32, num_warps=4, num_stages=2)]
_BWD_CONFIGS = [dict(BM=64, BN=64, num_warps=8, num_stages=2), dict(BM=32, BN=64, num_warps=4, num_stages=2),
                dict(BM=64, BN=32, num_warps=4, num_stages=2), dict(BM=32, BN=32, num_warps=4, num_stages=2)]
_KEY = ["BD", "BDV", "HAS_WINDOW", "HAS_SEG", "DOT"]


@jit
def _visible(pos, j, S, window, seg_q, SEG, b, ssb, HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr):
    """(BM, BN) mask: key j is visible from position pos."""
    vis = (j[None, :] <= pos[:, None]) & (j[None, :] < S)
    if HAS_WINDOW:
        vis = vis & (pos[:, None] - j[None, :] < window)
    if HAS_SEG:
        seg_k = tl.load(SEG + b * ssb + j, mask=j < S, other=-2)
        vis = vis & (seg_q[:, None] == seg_k[None, :])
    return vis


@autotune(_FWD_CONFIGS, key=_KEY, interpret=dict(BM=16, BN=16))
@jit
def _fwd_kernel(Q, K, V, O, LSE, SEG, Tq, S, H, R, window, scale, D, DV,
                sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, ssb,
                HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, DOT: tl.constexpr,
                BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pm = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    g = h // R
    i = pm * BM + tl.arange(0, BM)
    pos = S - Tq + i
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + i[:, None] * sqt + h * sqh + dd[None, :], mask=(i[:, None] < Tq) & (dd[None, :] < D),
                other=0.0)
    seg_q = pos
    if HAS_SEG:
        seg_q = tl.load(SEG + b * ssb + pos, mask=i < Tq, other=-1)
    m = tl.full((BM,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BDV), dtype=tl.float32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, S - Tq + pm * BM - window + 1) // BN * BN
    hi = S - Tq + tl.minimum(pm * BM + BM, Tq)
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        k = tl.load(K + b * skb + j[:, None] * skt + g * skh + dd[None, :], mask=(j[:, None] < S) & (dd[None, :] < D),
                    other=0.0)
        v = tl.load(V + b * svb + j[:, None] * svt + g * svh + dv[None, :], mask=(j[:, None] < S) & (dv[None, :] < DV),
                    other=0.0)
        x = mma(q, tl.trans(k), DOT) * scale
        x = tl.where(_visible(pos, j, S, window, seg_q, SEG, b, ssb, HAS_WINDOW, HAS_SEG), x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(x - m_use[:, None])
        corr = tl.exp(m - m_use)
        z = z * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + mma(p, v, DOT)
        m = m_new
    safe = tl.where(z > 0, z, 1.0)
    o = acc / safe[:, None]
    tl.store(O + b * sob + i[:, None] * sot + h * soh + dv[None, :], o.to(O.dtype.element_ty),
             mask=(i[:, None] < Tq) & (dv[None, :] < DV))
    tl.store(LSE + (b * H + h) * Tq + i, m + tl.log(safe), mask=i < Tq)


@autotune(_BWD_CONFIGS, key=_KEY, interpret=dict(BM=16, BN=16))
@jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, SEG, Tq, S, H, Hkv, R, window, scale, D, DV,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, skgb, skgt, skgh, svgb, svgt, svgh, ssb,
                     HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, DOT: tl.constexpr,
                     BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pn = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // Hkv).to(tl.int64)
    g = bg % Hkv
    j = pn * BN + tl.arange(0, BN)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    k = tl.load(K + b * skb + j[:, None] * skt + g * skh + dd[None, :], mask=(j[:, None] < S) & (dd[None, :] < D),
                other=0.0)
    v = tl.load(V + b * svb + j[:, None] * svt + g * svh + dv[None, :], mask=(j[:, None] < S) & (dv[None, :] < DV),
                other=0.0)
    dk = tl.zeros((BN, BD), dtype=tl.float32)
    dvacc = tl.zeros((BN, BDV), dtype=tl.float32)
    # queries that may see these keys: position >= first key, and within the window of the last key
    i_lo = tl.maximum(0, pn * BN - (S - Tq)) // BM * BM
    i_hi = Tq
    if HAS_WINDOW:
        i_hi = tl.minimum(Tq, pn * BN + BN - 1 + window - (S - Tq))
    for r in range(0, R):
        h = g * R + r
        for i0 in range(i_lo, i_hi, BM):
            i = i0 + tl.arange(0, BM)
            pos = S - Tq + i
            rows = i < Tq
            q = tl.load(Q + b * sqb + i[:, None] * sqt + h * sqh + dd[None, :], mask=rows[:, None] & (dd[None, :] < D),
                        other=0.0)
            do = tl.load(DO + b * sdb + i[:, None] * sdt + h * sdh + dv[None, :],
                         mask=rows[:, None] & (dv[None, :] < DV), other=0.0)
            lse = tl.load(LSE + (b * H + h) * Tq + i, mask=rows, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * Tq + i, mask=rows, other=0.0)
            seg_q = pos
            if HAS_SEG:
                seg_q = tl.load(SEG + b * ssb + pos, mask=rows, other=-1)
            vis = _visible(pos, j, S, window, seg_q, SEG, b, ssb, HAS_WINDOW, HAS_SEG) & rows[:, None]
            x = mma(q, tl.trans(k), DOT) * scale
            p = tl.where(vis, tl.exp(x - lse[:, None]), 0.0)
            dvacc += mma(tl.trans(p), do, DOT)
            dp = mma(do, tl.trans(v), DOT)
            ds = p * (dp - delta[:, None])
            dk += mma(tl.trans(ds), q, DOT)
    tl.store(DK + b * skgb + j[:, None] * skgt + g * skgh + dd[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=(j[:, None] < S) & (dd[None, :] < D))
    tl.store(DV_ + b * svgb + j[:, None] * svgt + g * svgh + dv[None, :], dvacc.to(DV_.dtype.element_ty),
             mask=(j[:, None] < S) & (dv[None, :] < DV))


@autotune(_BWD_CONFIGS, key=_KEY, interpret=dict(BM=16, BN=16))
@jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEG, Tq, S, H, R, window, scale, D, DV,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, sqgb, sqgt, sqgh, ssb,
                   HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, DOT: tl.constexpr,
                   BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pm = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    g = h // R
    i = pm * BM + tl.arange(0, BM)
    pos = S - Tq + i
    rows = i < Tq
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + i[:, None] * sqt + h * sqh + dd[None, :], mask=rows[:, None] & (dd[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdb + i[:, None] * sdt + h * sdh + dv[None, :], mask=rows[:, None] & (dv[None, :] < DV),
                 other=0.0)
    lse = tl.load(LSE + (b * H + h) * Tq + i, mask=rows, other=0.0)
    delta = tl.load(DELTA + (b * H + h) * Tq + i, mask=rows, other=0.0)
    seg_q = pos
    if HAS_SEG:
        seg_q = tl.load(SEG + b * ssb + pos, mask=rows, other=-1)
    dq = tl.zeros((BM, BD), dtype=tl.float32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, S - Tq + pm * BM - window + 1) // BN * BN
    hi = S - Tq + tl.minimum(pm * BM + BM, Tq)
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        k = tl.load(K + b * skb + j[:, None] * skt + g * skh + dd[None, :], mask=(j[:, None] < S) & (dd[None, :] < D),
                    other=0.0)
        v = tl.load(V + b * svb + j[:, None] * svt + g * svh + dv[None, :], mask=(j[:, None] < S) & (dv[None, :] < DV),
                    other=0.0)
        vis = _visible(pos, j, S, window, seg_q, SEG, b, ssb, HAS_WINDOW, HAS_SEG) & rows[:, None]
        x = mma(q, tl.trans(k), DOT) * scale
        p = tl.where(vis, tl.exp(x - lse[:, None]), 0.0)
        dp = mma(do, tl.trans(v), DOT)
        ds = p * (dp - delta[:, None])
        dq += mma(ds, k, DOT)
    tl.store(DQ + b * sqgb + i[:, None] * sqgt + h * sqgh + dd[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=rows[:, None] & (dd[None, :] < D))


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _AttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None,
                seq_idx: Tensor | None) -> Tensor:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        B, Tq, H, D = q.shape
        S, Hkv, DV = k.shape[1], k.shape[2], v.shape[3]
        seg = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        o = torch.empty(B, Tq, H, DV, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
        meta = dict(HAS_WINDOW=window is not None, HAS_SEG=seg is not None, DOT=dot_dtype(q.dtype),
                    BD=next_pow2(D), BDV=next_pow2(DV))
        _fwd_kernel[lambda m: (triton.cdiv(Tq, m["BM"]), B * H)](
            q, k, v, o, lse, seg if seg is not None else lse, Tq, S, H, H // Hkv, window or 0, scale, D, DV,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), 0 if seg is None else seg.stride(0), **meta)
        ctx.save_for_backward(q, k, v, o, lse, seg)
        ctx.args = (scale, window, meta)
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, lse, seg = ctx.saved_tensors
        scale, window, meta = ctx.args
        B, Tq, H, D = q.shape
        S, Hkv, DV = k.shape[1], k.shape[2], v.shape[3]
        do = do if do.stride(-1) == 1 else do.contiguous()
        delta = torch.einsum("bthd,bthd->bht", do.float(), o.float()).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        seg_arg = seg if seg is not None else lse
        ssb = 0 if seg is None else seg.stride(0)
        common = (Tq, S, H)
        _bwd_dkdv_kernel[lambda m: (triton.cdiv(S, m["BN"]), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, seg_arg, *common, Hkv, H // Hkv, window or 0, scale, D, DV,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), ssb, **meta)
        _bwd_dq_kernel[lambda m: (triton.cdiv(Tq, m["BM"]), B * H)](
            q, k, v, do, lse, delta, dq, seg_arg, *common, H // Hkv, window or 0, scale, D, DV,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), ssb, **meta)
        return dq, dk, dv, None, None, None


def _supports(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, window: int | None = None,
              seq_idx: Tensor | None = None) -> Reason:
    why = check_tensors(q, k, v, seq_idx)
    if why is not None:
        return why
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dim > {MAX_HEAD_DIM} not supported (got d={q.shape[-1]}, dv={v.shape[-1]})"
    return None


def _auto(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Reason:
    if q.shape[1] == 1 and k.shape[1] > 1:
        return "one decoding query: blocks of 16+ query rows would be mostly idle (pin to force)"
    return auto_check(q, k, v, **kwargs)


@attention.register("triton", priority=15, probe=triton_probe, supports=_supports, auto=_auto)
def attention_triton(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                     window: int | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """q (B, Tq, H, d), k (B, S, Hkv, d), v (B, S, Hkv, dv) -> (B, Tq, H, dv); contract in kernels.attention."""
    check_inputs(q, k, v, seq_idx, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if window is not None and window >= k.shape[1]:
        window = None  # hides nothing
    return _AttentionTriton.apply(q, k, v, scale, window, seq_idx)
