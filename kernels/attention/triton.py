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
from einops import rearrange
from torch import Tensor

from kernels.attention.contract import attention, check_inputs
from kernels.triton_utils import (Reason, auto_check, autotune, check_tensors, dot_dtype, jit, length_bucket,
                                  load_tile, mma, next_pow2, product_dtype, split_program, store_tile, tl, triton,
                                  triton_probe)

MAX_HEAD_DIM = 256

# First config first: the one a single-config run uses (it fits every head dim, see _prune).
_FWD_CONFIGS = [dict(BM=64, BN=64, num_warps=4, num_stages=2), dict(BM=128, BN=64, num_warps=8, num_stages=3),
                dict(BM=64, BN=64, num_warps=4, num_stages=3), dict(BM=128, BN=32, num_warps=4, num_stages=3),
                dict(BM=64, BN=32, num_warps=4, num_stages=2)]
_BWD_CONFIGS = [dict(BM=32, BN=64, num_warps=4, num_stages=2), dict(BM=64, BN=64, num_warps=8, num_stages=2),
                dict(BM=64, BN=32, num_warps=4, num_stages=2), dict(BM=32, BN=32, num_warps=4, num_stages=2)]
_KEY = ["BD", "BDV", "HAS_WINDOW", "HAS_SEG", "DOT", "TB"]  # TB: the keys' length bucket
_LENGTHS = ["Tq", "S", "window", "ssb", "TB"]  # vary from call to call: never specialised on


def _prune(configs: list[dict], args: dict) -> list[dict]:
    """Drop configs too big for these inputs: 128-row query blocks for short sequences, and for head
    dims above 128 everything but the smallest tiles (shared memory; measured by compiling for sm_90)."""
    if args["Tq"] <= 64:
        configs = [c for c in configs if c["BM"] <= 64]
    if max(args["BD"], args["BDV"]) > 128:
        configs = [c for c in configs if c["BM"] * c["BN"] <= 64 * 64 and c["num_stages"] <= 2]
    return configs


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


@jit
def _query_rows(pm, Tq, S, SEG, b, ssb, HAS_SEG: tl.constexpr, BM: tl.constexpr):
    """Query block pm: rows i, their key positions S - Tq + i, and their segment ids (positions without segments)."""
    i = pm * BM + tl.arange(0, BM)
    pos = S - Tq + i
    seg_q = pos
    if HAS_SEG:
        seg_q = tl.load(SEG + b * ssb + pos, mask=i < Tq, other=-1)
    return i, pos, seg_q


@jit
def _query_program(Tq, S, H, R, SEG, ssb, HAS_SEG: tl.constexpr, BM: tl.constexpr):
    """This program's query block pm, batch b, head h and its key/value head g, rows i, positions, segments."""
    pm = tl.program_id(0)
    b, h = split_program(tl.program_id(1), H)
    i, pos, seg_q = _query_rows(pm, Tq, S, SEG, b, ssb, HAS_SEG, BM)
    return pm, b, h, h // R, i, pos, seg_q


@jit
def _key_range(pm, Tq, S, window, HAS_WINDOW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """[lo, hi): the keys query block pm may see (causal, and within the window), lo a multiple of BN."""
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, S - Tq + pm * BM - window + 1) // BN * BN
    return lo, S - Tq + tl.minimum(pm * BM + BM, Tq)


@jit
def _query_range(pn, Tq, S, window, HAS_WINDOW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """[lo, hi): the queries that may see key block pn (at or after its first key, within the window
    of its last), lo a multiple of BM."""
    hi = Tq
    if HAS_WINDOW:
        hi = tl.minimum(Tq, pn * BN + BN - 1 + window - (S - Tq))
    return tl.maximum(0, pn * BN - (S - Tq)) // BM * BM, hi


@jit
def _row_stats(LSE, DELTA, off, i, Tq):
    """The forward's log-sum-exp and delta = rowsum(dO * O) of query rows i (0 past Tq)."""
    return tl.load(LSE + off + i, mask=i < Tq, other=0.0), tl.load(DELTA + off + i, mask=i < Tq, other=0.0)


@jit
def _probs_and_score_grads(q, k, v, do, lse, delta, vis, scale, DOT: tl.constexpr):
    """Backward tile (BM, BN): probabilities p = exp(q k^T scale - lse) where visible (else 0), and the
    gradient of the scores ds = p * (dO v^T - delta); dq = ds k, dk = ds^T q (times scale), dv = p^T dO."""
    p = tl.where(vis, tl.exp(mma(q, tl.trans(k), DOT) * scale - lse[:, None]), 0.0)
    return p, p * (mma(do, tl.trans(v), DOT) - delta[:, None])


@autotune(_FWD_CONFIGS, key=_KEY, interpret=dict(BM=16, BN=16), prune=_prune)
@jit(do_not_specialize=_LENGTHS)
def _fwd_kernel(Q, K, V, O, LSE, SEG, Tq, S, H, R, window, scale, D, DV,
                sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, ssb, TB,
                HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, DOT: tl.constexpr,
                BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pm, b, h, g, i, pos, seg_q = _query_program(Tq, S, H, R, SEG, ssb, HAS_SEG, BM)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q = load_tile(Q + b * sqb + h * sqh, i, dd, sqt, Tq, D)
    m = tl.full((BM,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BDV), dtype=tl.float32)
    lo, hi = _key_range(pm, Tq, S, window, HAS_WINDOW, BM, BN)
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        k = load_tile(K + b * skb + g * skh, j, dd, skt, S, D)
        v = load_tile(V + b * svb + g * svh, j, dv, svt, S, DV)
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
    store_tile(O + b * sob + h * soh, i, dv, sot, Tq, DV, acc / safe[:, None])
    tl.store(LSE + (b * H + h) * Tq + i, m + tl.log(safe), mask=i < Tq)


@autotune(_BWD_CONFIGS, key=_KEY, interpret=dict(BM=16, BN=16), prune=_prune)
@jit(do_not_specialize=_LENGTHS)
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, SEG, Tq, S, H, Hkv, R, window, scale, D, DV,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, skgb, skgt, skgh, svgb, svgt, svgh, ssb,
                     TB, HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, DOT: tl.constexpr,
                     BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pn = tl.program_id(0)
    b, g = split_program(tl.program_id(1), Hkv)
    j = pn * BN + tl.arange(0, BN)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    k = load_tile(K + b * skb + g * skh, j, dd, skt, S, D)
    v = load_tile(V + b * svb + g * svh, j, dv, svt, S, DV)
    dk = tl.zeros((BN, BD), dtype=tl.float32)
    dvacc = tl.zeros((BN, BDV), dtype=tl.float32)
    i_lo, i_hi = _query_range(pn, Tq, S, window, HAS_WINDOW, BM, BN)
    for r in range(0, R):
        h = g * R + r
        for i0 in range(i_lo, i_hi, BM):
            i, pos, seg_q = _query_rows(i0 // BM, Tq, S, SEG, b, ssb, HAS_SEG, BM)
            q = load_tile(Q + b * sqb + h * sqh, i, dd, sqt, Tq, D)
            do = load_tile(DO + b * sdb + h * sdh, i, dv, sdt, Tq, DV)
            lse, delta = _row_stats(LSE, DELTA, (b * H + h) * Tq, i, Tq)
            vis = _visible(pos, j, S, window, seg_q, SEG, b, ssb, HAS_WINDOW, HAS_SEG) & (i < Tq)[:, None]
            p, ds = _probs_and_score_grads(q, k, v, do, lse, delta, vis, scale, DOT)
            dvacc += mma(tl.trans(p), do, DOT)
            dk += mma(tl.trans(ds), q, DOT)
    store_tile(DK + b * skgb + g * skgh, j, dd, skgt, S, D, dk * scale)
    store_tile(DV_ + b * svgb + g * svgh, j, dv, svgt, S, DV, dvacc)


@autotune(_BWD_CONFIGS, key=_KEY, interpret=dict(BM=16, BN=16), prune=_prune)
@jit(do_not_specialize=_LENGTHS)
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEG, Tq, S, H, R, window, scale, D, DV,
                   sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, sqgb, sqgt, sqgh, ssb, TB,
                   HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, DOT: tl.constexpr,
                   BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pm, b, h, g, i, pos, seg_q = _query_program(Tq, S, H, R, SEG, ssb, HAS_SEG, BM)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q = load_tile(Q + b * sqb + h * sqh, i, dd, sqt, Tq, D)
    do = load_tile(DO + b * sdb + h * sdh, i, dv, sdt, Tq, DV)
    lse, delta = _row_stats(LSE, DELTA, (b * H + h) * Tq, i, Tq)
    dq = tl.zeros((BM, BD), dtype=tl.float32)
    lo, hi = _key_range(pm, Tq, S, window, HAS_WINDOW, BM, BN)
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        k = load_tile(K + b * skb + g * skh, j, dd, skt, S, D)
        v = load_tile(V + b * svb + g * svh, j, dv, svt, S, DV)
        vis = _visible(pos, j, S, window, seg_q, SEG, b, ssb, HAS_WINDOW, HAS_SEG) & (i < Tq)[:, None]
        _, ds = _probs_and_score_grads(q, k, v, do, lse, delta, vis, scale, DOT)
        dq += mma(ds, k, DOT)
    store_tile(DQ + b * sqgb + h * sqgh, i, dd, sqgt, Tq, D, dq * scale)


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
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), 0 if seg is None else seg.stride(0),
            length_bucket(S), **meta)
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
        delta = rearrange((do.float() * o.float()).sum(-1), "b t h -> b h t").contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        seg_arg = seg if seg is not None else lse
        ssb = 0 if seg is None else seg.stride(0)
        common = (Tq, S, H)
        _bwd_dkdv_kernel[lambda m: (triton.cdiv(S, m["BN"]), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, seg_arg, *common, Hkv, H // Hkv, window or 0, scale, D, DV,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), ssb,
            length_bucket(S), **meta)
        _bwd_dq_kernel[lambda m: (triton.cdiv(Tq, m["BM"]), B * H)](
            q, k, v, do, lse, delta, dq, seg_arg, *common, H // Hkv, window or 0, scale, D, DV,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), ssb, length_bucket(S), **meta)
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


# Below sdpa until a GPU measurement ranks it; our own kernels also wait for kernels.validate() on each device.
@attention.register("triton", priority=5, probe=triton_probe, supports=_supports, auto=_auto, needs_validation=True)
def attention_triton(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                     window: int | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """q (B, Tq, H, d), k (B, S, Hkv, d), v (B, S, Hkv, dv) -> (B, Tq, H, dv); contract in kernels.attention.

    Under autocast, float32 inputs are multiplied in autocast's dtype (as torch's own attention
    would); the output keeps q's dtype."""
    check_inputs(q, k, v, seq_idx, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if window is not None and window >= k.shape[1]:
        window = None  # hides nothing
    work = product_dtype(q)
    o = _AttentionTriton.apply(q.to(work), k.to(work), v.to(work), scale, window, seq_idx)
    return o.to(q.dtype)
