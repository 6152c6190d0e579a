"""`triton` backend of `ssd`: Mamba-2's chunked scan in Triton kernels, forward and backward.

Per (batch, head), chunks of Q steps (Q = the `chunk_size` hint rounded to a power of two in
[16, 64]); a_t = dt_t A, cs = cumulative sum of a inside each chunk, xd_t = dt_t x_t. Segment ids cut
every decay that spans a segment start (masks on equal ids; no -inf arithmetic). Per chunk c:
    L[t, s] = exp(cs_t - cs_s)  for s <= t in the same segment, else 0
    w_s = exp(cs_last - cs_s) [same segment as the chunk's last step]      (step s -> chunk-end state)
    v_t = exp(cs_t) [same segment as the step before the chunk]           (entering state -> step t)
    g_c = exp(cs_last) [chunk's last step in the segment of the step before it]
    S_c = sum_s w_s xd_s B_s^T                                   `_chunk_outer_kernel`
    H_{c+1} = g_c H_c + S_c,  H_0 = initial state                `_state_pass_kernel`
    y = (C B^T * L) xd + v * (C H_c^T)                           `_chunk_scan_kernel`
The scalars w, v, g and cs are computed by differentiable PyTorch around one autograd Function that
holds the kernels; its backward runs the same pieces transposed:
    dY_c = sum_t v_t dy_t C_t^T                                  `_chunk_outer_kernel` again
    dH_c = g_c dH_{c+1} + dY_c,  dH_C = d(final state)           `_state_pass_kernel`, reversed
    dg_c = <dH_{c+1}, H_c>
    per chunk, `_chunk_scan_bwd_kernel`: dxd, dB, dC (per head; summed over each group's heads
    afterwards), dcs from L, dw, dv.
All state arithmetic is float32; products of half-precision runs use the tensor cores with float32
accumulation. States of every chunk boundary are kept for the backward: (Bt, T/Q + 1, H, P, N) float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from kernels.ssd.contract import check_inputs, ssd
from kernels.triton_utils import (INTERPRET, Reason, auto_check, autotune, check_tensors, dot_dtype, jit, mma,
                                  next_pow2, tl, triton, triton_probe)

MAX_HEAD_DIM = 128  # P
MAX_STATE_DIM = 128  # N
_WARPS = [dict(num_warps=4, num_stages=2), dict(num_warps=8, num_stages=2)]


@jit
def _load_rows(PTR, b, t, col, T, ncol, sb, st, BCOL: tl.constexpr):
    """Rows t (Q,) of a (batch, T, ..., ncol) tensor at column offset `col` (head / group): (Q, BCOL) fp32."""
    cc = tl.arange(0, BCOL)
    return tl.load(PTR + b * sb + t[:, None] * st + col + cc[None, :], mask=(t[:, None] < T) & (cc[None, :] < ncol),
                   other=0.0).to(tl.float32)


@jit
def _decay_matrix(CS, SEG, b, t, h, T, H, ssb, HAS_SEG: tl.constexpr):
    """L[t, s] = exp(cs_t - cs_s) for s <= t in one segment, 0 elsewhere: (Q, Q) fp32; and cs (Q,)."""
    cs = tl.load(CS + (b * T + t) * H + h, mask=t < T, other=0.0)
    keep = (t[:, None] >= t[None, :]) & (t[:, None] < T)
    if HAS_SEG:
        seg = tl.load(SEG + b * ssb + t, mask=t < T, other=-1)
        keep = keep & (seg[:, None] == seg[None, :])
    return tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf"))), cs


@autotune(_WARPS, key=["BP", "BN", "Q"], interpret={})
@jit
def _chunk_outer_kernel(X, COEF, Z, OUT, T, H, R, P, N, sxb, sxt, sxh, szb, szt, szg,
                        Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr):
    """OUT[b, c, h] = sum_{t in chunk c} COEF[b, t, h] X[b, t, h]^T Z[b, t, h // R]   (P, N), fp32."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t = c * Q + tl.arange(0, Q)
    x = _load_rows(X, b, t, h * sxh, T, P, sxb, sxt, BP)
    z = _load_rows(Z, b, t, (h // R) * szg, T, N, szb, szt, BN)
    coef = tl.load(COEF + (b * T + t) * H + h, mask=t < T, other=0.0)
    out = mma(tl.trans(x * coef[:, None]), z, DOT)
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    nchunks = tl.num_programs(0)
    tl.store(OUT + ((b * nchunks + c) * H + h) * P * N + pp[:, None] * N + nn[None, :], out,
             mask=(pp[:, None] < P) & (nn[None, :] < N))


@jit
def _state_pass_kernel(S, G, INIT, OUT, nC, H, PN, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLK: tl.constexpr):
    """Forward: OUT[:, 0] = INIT, OUT[:, c + 1] = G[:, c] OUT[:, c] + S[:, c].
    Reverse:    OUT[:, nC] = INIT, OUT[:, c] = G[:, c] OUT[:, c + 1] + S[:, c].
    S (Bt, nC, H, PN), G (Bt, nC, H), INIT (Bt, H, PN), OUT (Bt, nC + 1, H, PN); all fp32."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs = pid * BLK + tl.arange(0, BLK)
    mask = offs < PN
    if HAS_INIT:
        state = tl.load(INIT + (b * H + h) * PN + offs, mask=mask, other=0.0)
    else:
        state = tl.zeros((BLK,), dtype=tl.float32)
    first = nC if REVERSE else 0
    tl.store(OUT + ((b * (nC + 1) + first) * H + h) * PN + offs, state, mask=mask)
    for i in range(0, nC):
        c = nC - 1 - i if REVERSE else i
        g = tl.load(G + (b * nC + c) * H + h)
        s = tl.load(S + ((b * nC + c) * H + h) * PN + offs, mask=mask, other=0.0)
        state = g * state + s
        dest = c if REVERSE else c + 1
        tl.store(OUT + ((b * (nC + 1) + dest) * H + h) * PN + offs, state, mask=mask)


@autotune(_WARPS, key=["BP", "BN", "Q", "HAS_SEG"], interpret={})
@jit
def _chunk_scan_kernel(XD, CS, Bm, Cm, V, HS, SEG, Y, T, H, R, P, N, sbb, sbt, sbg, scb, sct, scg, ssb,
                       HAS_SEG: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr):
    """Y[b, chunk c, h] = (C B^T * L) xd + v * (C H_c^T), fp32."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t = c * Q + tl.arange(0, Q)
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    nchunks = tl.num_programs(0)
    xd = _load_rows(XD, b, t, h * P, T, P, T * H * P, H * P, BP)
    bm = _load_rows(Bm, b, t, (h // R) * sbg, T, N, sbb, sbt, BN)
    cm = _load_rows(Cm, b, t, (h // R) * scg, T, N, scb, sct, BN)
    decay, cs = _decay_matrix(CS, SEG, b, t, h, T, H, ssb, HAS_SEG)
    v = tl.load(V + (b * T + t) * H + h, mask=t < T, other=0.0)
    hc = tl.load(HS + ((b * (nchunks + 1) + c) * H + h) * P * N + pp[:, None] * N + nn[None, :],
                 mask=(pp[:, None] < P) & (nn[None, :] < N), other=0.0)
    y = mma(mma(cm, tl.trans(bm), DOT) * decay, xd, DOT) + v[:, None] * mma(cm, tl.trans(hc), DOT)
    tl.store(Y + ((b * T + t[:, None]) * H + h) * P + pp[None, :], y, mask=(t[:, None] < T) & (pp[None, :] < P))


@autotune(_WARPS, key=["BP", "BN", "Q", "HAS_SEG"], interpret={})
@jit
def _chunk_scan_bwd_kernel(XD, CS, Bm, Cm, V, W, HS, DHS, DY, SEG, DXD, DB, DC, DCS, DW, DV,
                           T, H, R, P, N, sbb, sbt, sbg, scb, sct, scg, ssb,
                           HAS_SEG: tl.constexpr, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                           DOT: tl.constexpr):
    """Gradients of one chunk (see the module docstring); DB, DC per head, everything fp32."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t = c * Q + tl.arange(0, Q)
    rows = t < T
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    nchunks = tl.num_programs(0)
    xd = _load_rows(XD, b, t, h * P, T, P, T * H * P, H * P, BP)
    dy = _load_rows(DY, b, t, h * P, T, P, T * H * P, H * P, BP)
    bm = _load_rows(Bm, b, t, (h // R) * sbg, T, N, sbb, sbt, BN)
    cm = _load_rows(Cm, b, t, (h // R) * scg, T, N, scb, sct, BN)
    decay, cs = _decay_matrix(CS, SEG, b, t, h, T, H, ssb, HAS_SEG)
    v = tl.load(V + (b * T + t) * H + h, mask=rows, other=0.0)
    w = tl.load(W + (b * T + t) * H + h, mask=rows, other=0.0)
    pn = pp[:, None] * N + nn[None, :]
    pn_mask = (pp[:, None] < P) & (nn[None, :] < N)
    hc = tl.load(HS + ((b * (nchunks + 1) + c) * H + h) * P * N + pn, mask=pn_mask, other=0.0)
    ds = tl.load(DHS + ((b * (nchunks + 1) + c + 1) * H + h) * P * N + pn, mask=pn_mask, other=0.0)

    m = mma(cm, tl.trans(bm), DOT) * decay  # (Q, Q) C B^T * L
    dm = mma(dy, tl.trans(xd), DOT)  # (Q, Q)
    dxd = mma(tl.trans(m), dy, DOT) + mma(bm * w[:, None], tl.trans(ds), DOT)
    dg = dm * decay
    dh = mma(dy, hc, DOT)  # (Q, N): dy H_c
    dc = mma(dg, bm, DOT) + v[:, None] * dh
    dv = tl.sum(cm * dh, 1)
    xs = mma(xd, ds, DOT)  # (Q, N): xd dS
    db = mma(tl.trans(dg), cm, DOT) + w[:, None] * xs
    dw = tl.sum(bm * xs, 1)
    dll = dm * m
    dcs = tl.sum(dll, 1) - tl.sum(dll, 0)

    qp = (t[:, None] < T) & (pp[None, :] < P)
    qn = (t[:, None] < T) & (nn[None, :] < N)
    th = (b * T + t) * H + h
    tl.store(DXD + th[:, None] * P + pp[None, :], dxd, mask=qp)
    tl.store(DB + th[:, None] * N + nn[None, :], db, mask=qn)
    tl.store(DC + th[:, None] * N + nn[None, :], dc, mask=qn)
    tl.store(DCS + th, dcs, mask=rows)
    tl.store(DW + th, dw, mask=rows)
    tl.store(DV + th, dv, mask=rows)


# ------------------------------------------------------------------------------------------ host side
def _chunk_len(chunk_size: int) -> int:
    return 16 if INTERPRET else min(64, next_pow2(chunk_size))


def _chunk_outer(X: Tensor, coef: Tensor, Z: Tensor, nC: int, Q: int) -> Tensor:
    """sum over each chunk of coef X^T Z: X (Bt, T, H, P), coef (Bt, T, H), Z (Bt, T, G, N) -> (Bt, nC, H, P, N)."""
    Bt, T, H, P = X.shape
    G, N = Z.shape[2:]
    out = torch.empty(Bt, nC, H, P, N, dtype=torch.float32, device=X.device)
    _chunk_outer_kernel[(nC, Bt * H)](X, coef, Z, out, T, H, H // G, P, N, X.stride(0), X.stride(1), X.stride(2),
                                      Z.stride(0), Z.stride(1), Z.stride(2), Q=Q, BP=next_pow2(P), BN=next_pow2(N),
                                      DOT=dot_dtype(Z.dtype))
    return out


def _state_pass(S: Tensor, g: Tensor, init: Tensor | None, reverse: bool) -> Tensor:
    Bt, nC, H, P, N = S.shape
    out = torch.empty(Bt, nC + 1, H, P, N, dtype=torch.float32, device=S.device)
    BLK = 256 if not INTERPRET else 64
    _state_pass_kernel[(triton.cdiv(P * N, BLK), Bt * H)](S, g, init if init is not None else S, out, nC, H, P * N,
                                                          HAS_INIT=init is not None, REVERSE=reverse, BLK=BLK)
    return out


class _SSDTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xd: Tensor, cs: Tensor, Bm: Tensor, Cm: Tensor, w: Tensor, v: Tensor, g: Tensor,
                init: Tensor | None, seg: Tensor | None, Q: int):
        """xd (Bt, T, H, P), cs/w/v (Bt, T, H), Bm/Cm (Bt, T, G, N), g (Bt, nC, H) float32 except B, C
        -> y (Bt, T, H, P) float32, final state (Bt, H, P, N) float32."""
        Bt, T, H, P = xd.shape
        G, N = Bm.shape[2:]
        nC = g.shape[1]
        init32 = None if init is None else init.float().contiguous()
        states = _state_pass(_chunk_outer(xd, w, Bm, nC, Q), g, init32, reverse=False)
        y = torch.empty(Bt, T, H, P, dtype=torch.float32, device=xd.device)
        _chunk_scan_kernel[(nC, Bt * H)](xd, cs, Bm, Cm, v, states, seg if seg is not None else cs, y, T, H, H // G, P, N,
                                         *Bm.stride()[:3], *Cm.stride()[:3], 0 if seg is None else seg.stride(0),
                                         HAS_SEG=seg is not None, Q=Q, BP=next_pow2(P), BN=next_pow2(N),
                                         DOT=dot_dtype(Bm.dtype))
        ctx.save_for_backward(xd, cs, Bm, Cm, w, v, g, states, seg)
        ctx.Q = Q
        ctx.init_dtype = None if init is None else init.dtype
        return y, states[:, nC].clone()

    @staticmethod
    def backward(ctx, dy: Tensor | None, dfinal: Tensor | None):
        xd, cs, Bm, Cm, w, v, g, states, seg = ctx.saved_tensors
        Q = ctx.Q
        Bt, T, H, P = xd.shape
        G, N = Bm.shape[2:]
        nC = g.shape[1]
        dy = torch.zeros_like(xd) if dy is None else dy.float().contiguous()
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        dstates = _state_pass(_chunk_outer(dy, v, Cm, nC, Q), g, dfinal, reverse=True)
        dg = torch.einsum("bchpn,bchpn->bch", dstates[:, 1:], states[:, :-1])
        dxd = torch.empty_like(xd)
        db, dc = (torch.empty(Bt, T, H, N, dtype=torch.float32, device=xd.device) for _ in range(2))
        dcs, dw, dv = (torch.empty(Bt, T, H, dtype=torch.float32, device=xd.device) for _ in range(3))
        _chunk_scan_bwd_kernel[(nC, Bt * H)](xd, cs, Bm, Cm, v, w, states, dstates, dy, seg if seg is not None else cs,
                                             dxd, db, dc, dcs, dw, dv, T, H, H // G, P, N,
                                             *Bm.stride()[:3], *Cm.stride()[:3], 0 if seg is None else seg.stride(0),
                                             HAS_SEG=seg is not None, Q=Q, BP=next_pow2(P), BN=next_pow2(N),
                                             DOT=dot_dtype(Bm.dtype))
        db = rearrange(db, "b t (g r) n -> b t g r n", g=G).sum(3).to(Bm.dtype)
        dc = rearrange(dc, "b t (g r) n -> b t g r n", g=G).sum(3).to(Cm.dtype)
        dinit = None if ctx.init_dtype is None else dstates[:, 0].to(ctx.init_dtype)
        return dxd, dcs, db, dc, dw, dv, dg, dinit, None, None


def _supports(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
              seq_idx: Tensor | None = None, chunk_size: int = 64, return_final_state: bool = False) -> Reason:
    why = check_tensors(x, dt, A, B, C, initial_state, seq_idx)
    if why is not None:
        return why
    if x.shape[-1] > MAX_HEAD_DIM:
        return f"head dim P > {MAX_HEAD_DIM} not supported (got {x.shape[-1]})"
    if B.shape[-1] > MAX_STATE_DIM:
        return f"state dim N > {MAX_STATE_DIM} not supported (got {B.shape[-1]})"
    return None


@ssd.register("triton", priority=30, probe=triton_probe, supports=_supports, auto=auto_check)
def ssd_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
               seq_idx: Tensor | None = None, chunk_size: int = 64, return_final_state: bool = False):
    """Chunked scan (see module docstring); shapes as in the op contract (kernels.ssd)."""
    check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    Bt, T, H, P = x.shape
    Q = _chunk_len(chunk_size)
    nC = triton.cdiv(T, Q)
    dt32 = dt.float()
    a = dt32 * A.float()
    cs = rearrange(F.pad(a, (0, 0, 0, nC * Q - T)), "b (c q) h -> b c q h", q=Q).cumsum(2)
    cs = rearrange(cs, "b c q h -> b (c q) h")[:, :T].contiguous()
    xd = (x.float() * dt32[..., None]).contiguous()
    idx = torch.arange(nC, device=x.device)
    last = (idx * Q + Q - 1).clamp(max=T - 1)  # each chunk's last step
    chunk_of = torch.arange(T, device=x.device) // Q
    cs_last = cs[:, last]  # (Bt, nC, H)
    w = torch.exp(cs_last[:, chunk_of] - cs)
    v = torch.exp(cs)
    g = torch.exp(cs_last)
    seg = None
    if seq_idx is not None:
        seg = seq_idx.to(torch.int32).contiguous()
        seg_last = seq_idx[:, last]
        seg_prev = seq_idx[:, (idx * Q - 1).clamp(min=0)]  # the step before each chunk (chunk 0: step 0)
        w = w * (seq_idx == seg_last[:, chunk_of])[..., None]
        v = v * (seq_idx == seg_prev[:, chunk_of])[..., None]
        g = g * (seg_last == seg_prev)[..., None]
    Bm, Cm = (t if t.stride(-1) == 1 else t.contiguous() for t in (B, C))
    y, final = _SSDTriton.apply(xd, cs, Bm, Cm, w.contiguous(), v.contiguous(), g.contiguous(), initial_state, seg, Q)
    y = y.to(x.dtype)
    return (y, final.to(x.dtype)) if return_final_state else y
