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
Every kernel works on the head dim P in blocks of PB (<= 64; 32 for float32): no program holds more
than a (Q, PB) and a (PB, N) tile of a state, so shared memory stays within sm_90's limit for every
supported P, N <= 128 and dtype (checked by compiling for sm_90, tests/test_triton_compile.py).
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
from kernels.triton_utils import (INTERPRET, Reason, auto_check, autotune, check_tensors, dot_dtype, exact_host_math,
                                  jit, length_bucket, load_tile, mma, next_pow2, product_dtype, split_program,
                                  store_tile, tl, triton, triton_probe)

MAX_HEAD_DIM = 128  # P
MAX_STATE_DIM = 128  # N
_WARPS = [dict(num_warps=4, num_stages=2), dict(num_warps=8, num_stages=2)]
_KEY = ["PB", "BN", "Q", "DOT", "TB"]  # TB: the length bucket
_LENGTHS = ["T", "ssb", "TB"]  # vary from call to call: never specialised on


@jit
def _decay_matrix(CS, SEG, b, t, h, T, H, ssb, HAS_SEG: tl.constexpr):
    """L[t, s] = exp(cs_t - cs_s) for s <= t in one segment, 0 elsewhere: (Q, Q) fp32; and cs (Q,)."""
    cs = tl.load(CS + (b * T + t) * H + h, mask=t < T, other=0.0)
    keep = (t[:, None] >= t[None, :]) & (t[:, None] < T)
    if HAS_SEG:
        seg = tl.load(SEG + b * ssb + t, mask=t < T, other=-1)
        keep = keep & (seg[:, None] == seg[None, :])
    return tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf"))), cs


@jit
def _chunk_rows(c, H, Q: tl.constexpr):
    """Program (chunk c, batch x head) -> (batch int64, head, the chunk's steps t (Q,))."""
    b, h = split_program(tl.program_id(1), H)
    return b, h, c * Q + tl.arange(0, Q)


@jit
def _state_block(PTR, b, c, h, nstates, H, P, N, pp, nn):
    """(PB, BN) rows pp of the (P, N) state of chunk boundary c (states: (batch, nstates, H, P, N) fp32)."""
    return load_tile(PTR + ((b * nstates + c) * H + h) * P * N, pp, nn, N, P, N)


@jit
def _scores(Bm, Cm, b, t, h, T, R, N, sbb, sbt, sbg, scb, sct, scg, BN: tl.constexpr):
    """This head's B and C rows of the chunk (Q, BN) fp32 (group h // R)."""
    nn = tl.arange(0, BN)
    bm = load_tile(Bm + b * sbb + (h // R) * sbg, t, nn, sbt, T, N).to(tl.float32)
    cm = load_tile(Cm + b * scb + (h // R) * scg, t, nn, sct, T, N).to(tl.float32)
    return bm, cm


@autotune(_WARPS, key=_KEY, interpret={})
@jit(do_not_specialize=_LENGTHS)
def _chunk_outer_kernel(X, COEF, Z, OUT, T, H, R, P, N, sxb, sxt, sxh, szb, szt, szg, TB,
                        Q: tl.constexpr, PB: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr):
    """OUT[b, c, h, p-block] = sum_{t in chunk c} COEF[b, t, h] X[b, t, h, p-block]^T Z[b, t, h // R]   (PB, N)."""
    c = tl.program_id(0)
    b, h, t = _chunk_rows(c, H, Q)
    pp = tl.program_id(2) * PB + tl.arange(0, PB)
    nn = tl.arange(0, BN)
    x = load_tile(X + b * sxb + h * sxh, t, pp, sxt, T, P).to(tl.float32)
    z = load_tile(Z + b * szb + (h // R) * szg, t, nn, szt, T, N)
    coef = tl.load(COEF + (b * T + t) * H + h, mask=t < T, other=0.0)
    out = mma(tl.trans(x * coef[:, None]), z, DOT)
    store_tile(OUT + ((b * tl.num_programs(0) + c) * H + h) * P * N, pp, nn, N, P, N, out)


@jit(do_not_specialize=["nC"])
def _state_pass_kernel(S, G, INIT, OUT, nC, H, PN, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLK: tl.constexpr):
    """Forward: OUT[:, 0] = INIT, OUT[:, c + 1] = G[:, c] OUT[:, c] + S[:, c].
    Reverse:    OUT[:, nC] = INIT, OUT[:, c] = G[:, c] OUT[:, c + 1] + S[:, c].
    S (Bt, nC, H, PN), G (Bt, nC, H), INIT (Bt, H, PN), OUT (Bt, nC + 1, H, PN); all fp32."""
    pid = tl.program_id(0)
    b, h = split_program(tl.program_id(1), H)
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


@autotune(_WARPS, key=_KEY + ["HAS_SEG"], interpret={})
@jit(do_not_specialize=_LENGTHS)
def _chunk_scan_kernel(XD, CS, Bm, Cm, V, HS, SEG, Y, T, H, R, P, N, sbb, sbt, sbg, scb, sct, scg, ssb, TB,
                       HAS_SEG: tl.constexpr, Q: tl.constexpr, PB: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr):
    """Y[b, chunk c, h, p-block] = (C B^T * L) xd + v * (C H_c^T), fp32."""
    c = tl.program_id(0)
    b, h, t = _chunk_rows(c, H, Q)
    pp = tl.program_id(2) * PB + tl.arange(0, PB)
    nn = tl.arange(0, BN)
    bm, cm = _scores(Bm, Cm, b, t, h, T, R, N, sbb, sbt, sbg, scb, sct, scg, BN)
    decay, cs = _decay_matrix(CS, SEG, b, t, h, T, H, ssb, HAS_SEG)
    v = tl.load(V + (b * T + t) * H + h, mask=t < T, other=0.0)
    xd = load_tile(XD + b * T * H * P + h * P, t, pp, H * P, T, P)
    hc = _state_block(HS, b, c, h, tl.num_programs(0) + 1, H, P, N, pp, nn)
    y = mma(mma(cm, tl.trans(bm), DOT) * decay, xd, DOT) + v[:, None] * mma(cm, tl.trans(hc), DOT)
    store_tile(Y + b * T * H * P + h * P, t, pp, H * P, T, P, y)


@autotune(_WARPS, key=_KEY + ["HAS_SEG"], interpret={})
@jit(do_not_specialize=_LENGTHS)
def _chunk_scan_bwd_kernel(XD, CS, Bm, Cm, V, W, HS, DHS, DY, SEG, DXD, DB, DC, DCS, DW, DV,
                           T, H, R, P, N, sbb, sbt, sbg, scb, sct, scg, ssb, TB,
                           HAS_SEG: tl.constexpr, Q: tl.constexpr, PB: tl.constexpr, BN: tl.constexpr,
                           DOT: tl.constexpr):
    """Gradients of one chunk (see the module docstring); DB, DC per head, everything fp32.
    The head dim is walked in blocks of PB: dxd per block, the (Q, Q) and (Q, N) sums accumulated."""
    c = tl.program_id(0)
    b, h, t = _chunk_rows(c, H, Q)
    rows = t < T
    nn = tl.arange(0, BN)
    nstates = tl.num_programs(0) + 1
    bm, cm = _scores(Bm, Cm, b, t, h, T, R, N, sbb, sbt, sbg, scb, sct, scg, BN)
    decay, cs = _decay_matrix(CS, SEG, b, t, h, T, H, ssb, HAS_SEG)
    v = tl.load(V + (b * T + t) * H + h, mask=rows, other=0.0)
    w = tl.load(W + (b * T + t) * H + h, mask=rows, other=0.0)

    m = mma(cm, tl.trans(bm), DOT) * decay  # (Q, Q) C B^T * L
    dm = tl.zeros((Q, Q), dtype=tl.float32)  # dy xd^T
    dh = tl.zeros((Q, BN), dtype=tl.float32)  # dy H_c
    xs = tl.zeros((Q, BN), dtype=tl.float32)  # xd dS
    for p0 in range(0, P, PB):
        pp = p0 + tl.arange(0, PB)
        xd = load_tile(XD + b * T * H * P + h * P, t, pp, H * P, T, P)
        dy = load_tile(DY + b * T * H * P + h * P, t, pp, H * P, T, P)
        hc = _state_block(HS, b, c, h, nstates, H, P, N, pp, nn)
        ds = _state_block(DHS, b, c + 1, h, nstates, H, P, N, pp, nn)
        dm += mma(dy, tl.trans(xd), DOT)
        dh += mma(dy, hc, DOT)
        xs += mma(xd, ds, DOT)
        dxd = mma(tl.trans(m), dy, DOT) + mma(bm * w[:, None], tl.trans(ds), DOT)
        store_tile(DXD + b * T * H * P + h * P, t, pp, H * P, T, P, dxd)
    dg = dm * decay
    dc = mma(dg, bm, DOT) + v[:, None] * dh
    db = mma(tl.trans(dg), cm, DOT) + w[:, None] * xs
    dll = dm * m
    th = (b * T + t) * H + h
    store_tile(DB + b * T * H * N + h * N, t, nn, H * N, T, N, db)  # DB, DC: (Bt, T, H, N)
    store_tile(DC + b * T * H * N + h * N, t, nn, H * N, T, N, dc)
    tl.store(DCS + th, tl.sum(dll, 1) - tl.sum(dll, 0), mask=rows)
    tl.store(DW + th, tl.sum(bm * xs, 1), mask=rows)
    tl.store(DV + th, tl.sum(cm * dh, 1), mask=rows)


# ------------------------------------------------------------------------------------------ host side
def _chunk_len(chunk_size: int) -> int:
    return 16 if INTERPRET else min(64, next_pow2(chunk_size))


def _p_block(P: int, dtype: torch.dtype) -> int:
    """Head-dim block of every kernel: float32 products run on the CUDA cores, so smaller tiles."""
    return 16 if INTERPRET else min(next_pow2(P), 32 if dtype == torch.float32 else 64)


def _meta(Q: int, P: int, N: int, T: int, dtype: torch.dtype) -> dict:
    return dict(Q=Q, PB=_p_block(P, dtype), BN=next_pow2(N), DOT=dot_dtype(dtype), TB=length_bucket(T))


def _chunk_outer(X: Tensor, coef: Tensor, Z: Tensor, nC: int, Q: int) -> Tensor:
    """sum over each chunk of coef X^T Z: X (Bt, T, H, P), coef (Bt, T, H), Z (Bt, T, G, N) -> (Bt, nC, H, P, N)."""
    Bt, T, H, P = X.shape
    G, N = Z.shape[2:]
    out = torch.empty(Bt, nC, H, P, N, dtype=torch.float32, device=X.device)
    meta = _meta(Q, P, N, T, Z.dtype)
    TB = meta.pop("TB")
    _chunk_outer_kernel[(nC, Bt * H, triton.cdiv(P, meta["PB"]))](
        X, coef, Z, out, T, H, H // G, P, N, *X.stride()[:3], *Z.stride()[:3], TB, **meta)
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
        meta = _meta(Q, P, N, T, Bm.dtype)
        TB = meta.pop("TB")
        _chunk_scan_kernel[(nC, Bt * H, triton.cdiv(P, meta["PB"]))](
            xd, cs, Bm, Cm, v, states, seg if seg is not None else cs, y, T, H, H // G, P, N, *Bm.stride()[:3],
            *Cm.stride()[:3], 0 if seg is None else seg.stride(0), TB, HAS_SEG=seg is not None, **meta)
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
        with exact_host_math(xd.device):
            dy = torch.zeros_like(xd) if dy is None else dy.float().contiguous()
            dfinal = None if dfinal is None else dfinal.float().contiguous()
            dstates = _state_pass(_chunk_outer(dy, v, Cm, nC, Q), g, dfinal, reverse=True)
            dg = (dstates[:, 1:] * states[:, :-1]).sum((-2, -1))
        dxd = torch.empty_like(xd)
        db, dc = (torch.empty(Bt, T, H, N, dtype=torch.float32, device=xd.device) for _ in range(2))
        dcs, dw, dv = (torch.empty(Bt, T, H, dtype=torch.float32, device=xd.device) for _ in range(3))
        meta = _meta(Q, P, N, T, Bm.dtype)
        TB = meta.pop("TB")
        _chunk_scan_bwd_kernel[(nC, Bt * H)](
            xd, cs, Bm, Cm, v, w, states, dstates, dy, seg if seg is not None else cs, dxd, db,
            dc, dcs, dw, dv, T, H, H // G, P, N, *Bm.stride()[:3], *Cm.stride()[:3],
            0 if seg is None else seg.stride(0), TB, HAS_SEG=seg is not None, **meta)
        db = rearrange(db, "b t (g r) n -> b t g r n", g=G).sum(3).to(Bm.dtype)
        dc = rearrange(dc, "b t (g r) n -> b t g r n", g=G).sum(3).to(Cm.dtype)
        dinit = None if ctx.init_dtype is None else dstates[:, 0].to(ctx.init_dtype)
        return dxd, dcs, db, dc, dw, dv, dg, dinit, None, None


def _supports(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
              seq_idx: Tensor | None = None, chunk_size: int = 64, return_final_state: bool = False) -> Reason:
    why = check_tensors(B, C, seq_idx, scalars=(x, dt, A, initial_state))
    if why is not None:
        return why
    if x.shape[-1] > MAX_HEAD_DIM:
        return f"head dim P > {MAX_HEAD_DIM} not supported (got {x.shape[-1]})"
    if B.shape[-1] > MAX_STATE_DIM:
        return f"state dim N > {MAX_STATE_DIM} not supported (got {B.shape[-1]})"
    return None


# Our own kernels: automatic selection waits for kernels.validate() on each device.
@ssd.register("triton", priority=30, probe=triton_probe, supports=_supports, auto=auto_check, needs_validation=True)
def ssd_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
               seq_idx: Tensor | None = None, chunk_size: int = 64, return_final_state: bool = False):
    """Chunked scan (see module docstring); shapes as in the op contract (kernels.ssd).

    Products of B and C run in their dtype, or in autocast's dtype for float32 inputs under autocast
    (x, dt, A and the states are float32 inside whatever their dtype, as a Mamba-2 layer under bf16
    autocast hands them over); y and the final state come back in x's dtype."""
    check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    Bt, T, H, P = x.shape
    Q = _chunk_len(chunk_size)
    nC = triton.cdiv(T, Q)
    work = product_dtype(B)
    with exact_host_math(x.device):
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
    Bm, Cm = (t.to(work) if t.stride(-1) == 1 else t.to(work).contiguous() for t in (B, C))
    y, final = _SSDTriton.apply(xd, cs, Bm, Cm, w.contiguous(), v.contiguous(), g.contiguous(), initial_state, seg, Q)
    y = y.to(x.dtype)
    return (y, final.to(x.dtype)) if return_final_state else y
