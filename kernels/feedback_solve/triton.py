"""`triton` backend of `feedback_solve`: fused Triton kernels, forward and backward (docs/triton.md).

Notation as in the op contract: new rows t = 0..T-1 sit at key positions P + t after a cache of P
rows; all keys kk = [past_k; k] and outputs ss = [past_s; s] have length L = P + T;
W[t, j] = gamma_t alpha[t, j] (the feedback matrix B_fb), alpha the strict-past softmax of
<q_t, kk_j> / sqrt(Dk). Rows are solved in blocks of BT rows; blocks are grouped into groups of G rows.

Forward
  1. `_stats_kernel`, all rows in parallel: lse_t = log sum_j exp(logit[t, j]) over the strict past
     (online max / sum over key tiles; the logits never reach memory).
  2. per group of rows [r0, r1), in order:
     a. `_weights_kernel`: W[r0:r1, :P + r1] in float32 into a (B, G, P + r1) buffer, from the
        logits recomputed tile by tile and the saved lse: the logits are computed once per row, not
        once per column tile of D;
     b. `inverse_kernel` (kernels.triton_tril): (I - W_ii)^-1 of each BT x BT diagonal block (unit lower triangular,
        by repeated squaring: (I - N)^-1 = (I + N)(I + N^2)(I + N^4)...), saved for the backward;
     c. rhs = f + W[:, :P + r0] @ ss[:P + r0]: the cache and all earlier groups, one batched GEMM;
     d. `solve_kernel` (kernels.triton_tril), parallel over batch and column tiles of D, block row by block row inside
        the group: s_i = (I - W_ii)^-1 (rhs_i + sum_{c < i in group} W_ic s_c).
Backward, with u = (I - W_new)^-T ds (so df = u):
  3. per group of columns, last group first: W[g0:, P + g0 : P + g1] into a buffer, rhs = ds +
     W[g1:, group]^T u[g1:] (GEMM), then `solve_t_kernel`: u_j = (I - W_jj)^-T (rhs_j + sum_{t > j
     in group} W_tj^T u_t), block columns from last to first;
  4. per group of rows: `_dlogits_kernel` recomputes alpha and P[t, j] = <u_t, ss_j> tile by tile
     and writes dlogit[t, j] = alpha[t, j] (gamma_t P[t, j] - e_t) with e_t = <u_t, s_t - f_t>
     (= gamma_t sum_j alpha P), plus dgamma_t = sum_j alpha[t, j] P[t, j]; dq and dkk are GEMMs of
     the dlogit buffer with kk and q; dpast_s = W[:, :P]^T u.
Float32 throughout except the q kk^T products of half-precision inputs (tensor cores, float32
accumulation). Memory: lse (B, T), ss in float32 (B, L, D), the diagonal inverses (B, T, BT) and
one (B, G, L) float32 buffer at a time, G = min(GROUP_ROWS, what fits in BUFFER_BYTES): never a
float32 T x T per sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.feedback_solve.contract import check_inputs, feedback_solve
from kernels.triton_tril import inverse_kernel, solve_kernel, solve_t_kernel
from kernels.triton_utils import (INTERPRET, Reason, auto_check, autotune, check_tensors, dot_dtype, exact_host_math,
                                  jit, length_bucket, mma, product_dtype, sm_count, tl, triton, triton_probe)

GROUP_ROWS = 512  # rows per group: more rows, fewer launches and longer in-group solves
BUFFER_BYTES = 256 * 2**20  # cap on the (B, G, L) float32 buffer
BT = 16 if INTERPRET else 64  # rows per solve block (diagonal blocks are BT x BT)

_TILE_CONFIGS = [dict(BR=64, BC=64, BK=64, num_warps=4, num_stages=3),
                 dict(BR=128, BC=64, BK=64, num_warps=8, num_stages=3),
                 dict(BR=64, BC=128, BK=32, num_warps=4, num_stages=3),
                 dict(BR=128, BC=128, BK=32, num_warps=8, num_stages=2)]
_TILE_INTERPRET = dict(BR=16, BC=16, BK=16)
_TILE_KEY = ["DK", "HAS_SEG", "DOT", "TB"]  # TB: the keys' length bucket
# row / column / length arguments that change from call to call (and group to group): never specialised on
_LENGTHS = ["T", "L", "P", "ssb", "r0", "nrows", "c0", "ncols", "blk0", "nblk", "col0", "row0", "swpb", "swpr", "sgb",
            "sgr", "TB"]


def _prune_tiles(configs: list[dict], args: dict) -> list[dict]:
    """128-row tiles only when there are more than 64 rows to cover."""
    return [c for c in configs if c["BR"] <= 64] if args.get("nrows", args["T"]) <= 64 else configs


def _padded(n: int) -> int:
    """Row length of the float32 work buffers: a multiple of 16, so their row strides keep one
    alignment class whatever the group (no recompilation per group) and loads stay vectorised."""
    return -(-n // 16) * 16


# ------------------------------------------------------------------------------------------ kernels
@jit
def _rows_dot_keys(A, B, rows, keys, nrows, nkeys, F, sat, sbt,
                   BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    """(BR, BC) float32 tile of A[rows] . B[keys] over F features, BK at a time (rows >= nrows and keys
    >= nkeys read as 0); A, B point at one batch row, with row strides sat, sbt."""
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for d0 in range(0, F, BK):
        dd = d0 + tl.arange(0, BK)
        a = tl.load(A + rows[:, None] * sat + dd[None, :], mask=(rows[:, None] < nrows) & (dd[None, :] < F), other=0.0)
        b = tl.load(B + keys[:, None] * sbt + dd[None, :], mask=(keys[:, None] < nkeys) & (dd[None, :] < F), other=0.0)
        acc += mma(a, tl.trans(b), DOT)
    return acc


@jit
def _logits(Q, K, SEG, b, rows, keys, T, L, P, DK, scale, sqb, sqt, skb, skt, ssb,
            HAS_SEG: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    """Scaled logits (BR, BC) of new rows `rows` against keys `keys`, -inf where not visible."""
    acc = _rows_dot_keys(Q + b * sqb, K + b * skb, rows, keys, T, L, DK, sqt, skt, BR, BC, BK, DOT)
    visible = (keys[None, :] < P + rows[:, None]) & (rows[:, None] < T)
    if HAS_SEG:
        seg_row = tl.load(SEG + b * ssb + P + rows, mask=rows < T, other=-1)
        seg_key = tl.load(SEG + b * ssb + keys, mask=keys < L, other=-2)
        visible = visible & (seg_row[:, None] == seg_key[None, :])
    return tl.where(visible, acc * scale, float("-inf")), visible


@jit
def _row_tile(r0, T, BR: tl.constexpr):
    """This program's tile of the (rows, keys, batch) grid: column tile pc, batch b, rows r0 + ri, the last row."""
    pr = tl.program_id(0)
    ri = pr * BR + tl.arange(0, BR)
    return tl.program_id(1), tl.program_id(2).to(tl.int64), ri, r0 + ri, tl.minimum(r0 + pr * BR + BR, T) - 1


@jit
def _alpha_gamma(Q, K, SEG, LSE, GAM, b, rows, keys, T, L, P, DK, scale, sqb, sqt, skb, skt, ssb,
                 HAS_SEG: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    """alpha (BR, BC), the strict-past softmax recomputed from the logits and the saved lse (0 where not
    visible), and gamma (BR,) of the rows."""
    x, visible = _logits(Q, K, SEG, b, rows, keys, T, L, P, DK, scale, sqb, sqt, skb, skt, ssb, HAS_SEG, BR, BC, BK, DOT)
    lse = tl.load(LSE + b * T + rows, mask=rows < T, other=0.0)
    return tl.where(visible, tl.exp(x - lse[:, None]), 0.0), tl.load(GAM + b * T + rows, mask=rows < T, other=0.0)


@autotune(_TILE_CONFIGS, key=_TILE_KEY, interpret=_TILE_INTERPRET, prune=_prune_tiles)
@jit(do_not_specialize=_LENGTHS)
def _stats_kernel(Q, K, SEG, LSE, T, L, P, DK, scale, sqb, sqt, skb, skt, ssb, TB,
                  HAS_SEG: tl.constexpr, DOT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """LSE[b, t] = log sum over the strict past of exp(logit); 0 for rows with no past."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * BR + tl.arange(0, BR)
    m = tl.full((BR,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BR,), dtype=tl.float32)
    end = P + tl.minimum(pid * BR + BR, T) - 1  # keys < end cover the strict past of every row here
    for c0 in range(0, end, BC):
        keys = c0 + tl.arange(0, BC)
        x, _ = _logits(Q, K, SEG, b, rows, keys, T, L, P, DK, scale, sqb, sqt, skb, skt, ssb, HAS_SEG, BR, BC, BK, DOT)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        z = z * tl.exp(m - m_use) + tl.sum(tl.exp(x - m_use[:, None]), 1)
        m = m_new
    lse = tl.where(z > 0, m + tl.log(tl.where(z > 0, z, 1.0)), 0.0)
    tl.store(LSE + b * T + rows, lse, mask=rows < T)


@autotune(_TILE_CONFIGS, key=_TILE_KEY, interpret=_TILE_INTERPRET, prune=_prune_tiles)
@jit(do_not_specialize=_LENGTHS)
def _weights_kernel(Q, K, SEG, LSE, GAM, W, r0, nrows, c0, ncols, T, L, P, DK, scale,
                    sqb, sqt, skb, skt, ssb, TB, swb, swr,
                    HAS_SEG: tl.constexpr, DOT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """W[b, i, j] = gamma_t alpha[t, key] for rows t = r0 + i < r0 + nrows, keys c0 + j < c0 + ncols."""
    pc, b, ri, rows, last_row = _row_tile(r0, T, BR)
    cj = pc * BC + tl.arange(0, BC)
    keys = c0 + cj
    if c0 + pc * BC < P + last_row:  # the tile holds some visible key
        alpha, g = _alpha_gamma(Q, K, SEG, LSE, GAM, b, rows, keys, T, L, P, DK, scale, sqb, sqt, skb, skt, ssb,
                                HAS_SEG, BR, BC, BK, DOT)
        w = alpha * g[:, None]
    else:
        w = tl.zeros((BR, BC), dtype=tl.float32)
    tl.store(W + b * swb + ri[:, None] * swr + cj[None, :], w, mask=(ri[:, None] < nrows) & (cj[None, :] < ncols))


@autotune([dict(BR=64, num_warps=4, num_stages=2), dict(BR=64, num_warps=8, num_stages=2),
           dict(BR=128, num_warps=8, num_stages=2)], key=["D"] + _TILE_KEY, interpret=dict(BR=16), prune=_prune_tiles)
@jit(do_not_specialize=_LENGTHS)
def _dlogits_kernel(Q, K, SEG, LSE, GAM, U, S, E, DL, DGP, WP, r0, nrows, ncols, T, L, P, DK, D, scale,
                    sqb, sqt, skb, skt, ssb, TB, sub, sut, s2b, s2t, sdb, sdr, sgb, sgr, swpb, swpr,
                    HAS_SEG: tl.constexpr, HAS_PAST: tl.constexpr, DOT: tl.constexpr,
                    BR: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """For rows r0 + i and keys j < ncols: DL = dlogit, DGP[.., pc] = the tile's part of dgamma,
    WP = W on the cache's columns (keys < P)."""
    pc, b, ri, rows, last_row = _row_tile(r0, T, BR)
    keys = pc * BC + tl.arange(0, BC)
    out = (ri[:, None] < nrows) & (keys[None, :] < ncols)
    if pc * BC < P + last_row:
        alpha, g = _alpha_gamma(Q, K, SEG, LSE, GAM, b, rows, keys, T, L, P, DK, scale, sqb, sqt, skb, skt, ssb,
                                HAS_SEG, BR, BC, BK, DOT)
        e = tl.load(E + b * T + rows, mask=rows < T, other=0.0)
        p = _rows_dot_keys(U + b * sub, S + b * s2b, rows, keys, T, L, D, sut, s2t, BR, BC, BK, tl.float32)
        dl = alpha * (g[:, None] * p - e[:, None])
        dg = tl.sum(alpha * p, 1)
        if HAS_PAST:
            tl.store(WP + b * swpb + ri[:, None] * swpr + keys[None, :], alpha * g[:, None],
                     mask=(ri[:, None] < nrows) & (keys[None, :] < P))
    else:
        dl = tl.zeros((BR, BC), dtype=tl.float32)
        dg = tl.zeros((BR,), dtype=tl.float32)
    tl.store(DL + b * sdb + ri[:, None] * sdr + keys[None, :], dl, mask=out)
    tl.store(DGP + b * sgb + ri * sgr + pc, dg, mask=ri < nrows)


# ------------------------------------------------------------------------------------------ host side
def _group_rows(B: int, L: int) -> int:
    """Rows per group: a multiple of BT, at most GROUP_ROWS, buffer (B, G, L) float32 within BUFFER_BYTES."""
    fit = BUFFER_BYTES // max(1, 4 * B * L)
    return max(BT, min(GROUP_ROWS, fit) // BT * BT)


def _column_tile(B: int, D: int, device: torch.device) -> int:
    """Column tile of the solve kernels: 16..64, small enough to give every SM a program."""
    if INTERPRET:
        return 16
    sms = sm_count(device)
    bd = 64
    while bd > 16 and B * triton.cdiv(D, bd) < sms:
        bd //= 2
    return bd


def _grid2(n0, n1=None):
    return lambda meta: (triton.cdiv(n0, meta["BR"]), *(() if n1 is None else (triton.cdiv(n1, meta["BC"]),)))


class _FeedbackSolveTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, past_k: Tensor | None, past_s: Tensor | None,
                seq_idx: Tensor | None) -> Tensor:
        B, T, D = f.shape
        Dk = q.shape[2]
        P = 0 if past_k is None else past_k.shape[1]
        L = P + T
        dev = f.device
        scale = 1.0 / math.sqrt(Dk)
        DOT = dot_dtype(q.dtype)
        q = q.contiguous()
        keys = (k if P == 0 else torch.cat([past_k, k], dim=1)).contiguous()
        seg = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        g32 = gamma.float().contiguous()
        ss = torch.empty(B, L, D, dtype=torch.float32, device=dev)
        if P:
            ss[:, :P] = past_s
        lse = torch.empty(B, T, dtype=torch.float32, device=dev)
        seg_arg = seg if seg is not None else lse  # never read without HAS_SEG
        common = (T, L, P, Dk, scale, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
                  0 if seg is None else seg.stride(0), length_bucket(L))
        _stats_kernel[lambda m: (triton.cdiv(T, m["BR"]), B)](q, keys, seg_arg, lse, *common,
                                                              HAS_SEG=seg is not None, DOT=DOT)
        nblk = triton.cdiv(T, BT)
        inv = torch.empty(B, nblk, BT, BT, dtype=torch.float32, device=dev)
        G = _group_rows(B, L)
        BD = _column_tile(B, D, dev)
        for r0 in range(0, T, G):
            r1 = min(T, r0 + G)
            n, ncols = r1 - r0, P + r1
            w = torch.empty(B, n, _padded(ncols), dtype=torch.float32, device=dev)
            _weights_kernel[lambda m: (triton.cdiv(n, m["BR"]), triton.cdiv(ncols, m["BC"]), B)](
                q, keys, seg_arg, lse, g32, w, r0, n, 0, ncols, *common, w.stride(0), w.stride(1),
                HAS_SEG=seg is not None, DOT=DOT)
            inverse_kernel[(triton.cdiv(n, BT), B)](w, inv, r0 // BT, nblk, n, P + r0, w.stride(0), w.stride(1),
                                                     BT=BT)
            rhs = f[:, r0:r1].float()
            if P + r0:
                rhs = torch.baddbmm(rhs, w[:, :, :P + r0], ss[:, :P + r0])
            rhs = rhs.contiguous()
            solve_kernel[(triton.cdiv(D, BD), B)](rhs, w, inv, ss, r0 // BT, nblk, n, P + r0, P + r0, D,
                                                  rhs.stride(0), rhs.stride(1), w.stride(0), w.stride(1),
                                                  ss.stride(0), ss.stride(1), BT=BT, BD=BD)
        ctx.save_for_backward(f, q, keys, g32, ss, lse, inv, seg)
        ctx.shape = (B, T, D, Dk, P, scale, G, BD)
        ctx.dtypes = (f.dtype, q.dtype, k.dtype, gamma.dtype,
                      None if past_k is None else past_k.dtype, None if past_s is None else past_s.dtype)
        return ss[:, P:].to(f.dtype, copy=True)  # never a view of the saved ss

    @staticmethod
    def backward(ctx, ds: Tensor):
        with exact_host_math(ds.device):
            return _FeedbackSolveTriton.gradients(ctx, ds)

    @staticmethod
    def gradients(ctx, ds: Tensor):
        f, q, keys, g32, ss, lse, inv, seg = ctx.saved_tensors
        B, T, D, Dk, P, scale, G, BD = ctx.shape
        L = P + T
        dev = ds.device
        DOT = dot_dtype(q.dtype)
        nblk = inv.shape[1]
        seg_arg = seg if seg is not None else lse
        common = (T, L, P, Dk, scale, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
                  0 if seg is None else seg.stride(0), length_bucket(L))
        ds32 = ds.float()
        u = torch.empty(B, T, D, dtype=torch.float32, device=dev)
        # transposed solve, groups of columns from the last
        for g0 in reversed(range(0, T, G)):
            g1 = min(T, g0 + G)
            nrows, ncols = T - g0, g1 - g0
            w = torch.empty(B, nrows, _padded(ncols), dtype=torch.float32, device=dev)
            _weights_kernel[lambda m: (triton.cdiv(nrows, m["BR"]), triton.cdiv(ncols, m["BC"]), B)](
                q, keys, seg_arg, lse, g32, w, g0, nrows, P + g0, ncols, *common, w.stride(0), w.stride(1),
                HAS_SEG=seg is not None, DOT=DOT)
            rhs = ds32[:, g0:g1]
            if g1 < T:
                rhs = torch.baddbmm(rhs, w[:, ncols:, :ncols].transpose(1, 2), u[:, g1:])
            rhs = rhs.contiguous()
            solve_t_kernel[(triton.cdiv(D, BD), B)](rhs, w, inv, u, g0 // BT, nblk, ncols, g0, D,
                                                    rhs.stride(0), rhs.stride(1), w.stride(0), w.stride(1),
                                                    u.stride(0), u.stride(1), BT=BT, BD=BD)
        e = torch.einsum("btd,btd->bt", u, ss[:, P:] - f.float()).contiguous()  # gamma_t sum_j alpha P
        keys32, q32 = keys.float(), q.float()
        dq = torch.empty(B, T, Dk, dtype=torch.float32, device=dev)
        dkeys = torch.zeros(B, L, Dk, dtype=torch.float32, device=dev)
        dgamma = torch.empty(B, T, dtype=torch.float32, device=dev)
        dpast_s = torch.zeros(B, P, D, dtype=torch.float32, device=dev) if P else None
        BC = 16 if BT == 16 else 64  # fixed: it sets the number of dgamma partial sums
        for r0 in range(0, T, G):
            r1 = min(T, r0 + G)
            n, ncols = r1 - r0, P + r1
            dl = torch.empty(B, n, _padded(ncols), dtype=torch.float32, device=dev)
            dgp = torch.empty(B, n, triton.cdiv(ncols, BC), dtype=torch.float32, device=dev)
            wp = torch.empty(B, n, P, dtype=torch.float32, device=dev) if P else dl
            _dlogits_kernel[lambda m: (triton.cdiv(n, m["BR"]), triton.cdiv(ncols, BC), B)](
                q, keys, seg_arg, lse, g32, u, ss, e, dl, dgp, wp, r0, n, ncols, T, L, P, Dk, D, scale,
                q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), 0 if seg is None else seg.stride(0),
                length_bucket(L), u.stride(0), u.stride(1), ss.stride(0), ss.stride(1), dl.stride(0), dl.stride(1),
                dgp.stride(0), dgp.stride(1), wp.stride(0), wp.stride(1),
                HAS_SEG=seg is not None, HAS_PAST=P > 0, DOT=DOT, BC=BC, BK=BC)
            dq[:, r0:r1] = torch.bmm(dl[:, :, :ncols], keys32[:, :ncols])
            dkeys[:, :ncols].baddbmm_(dl[:, :, :ncols].transpose(1, 2), q32[:, r0:r1])
            dgamma[:, r0:r1] = dgp.sum(-1)
            if P:
                dpast_s.baddbmm_(wp.transpose(1, 2), u[:, r0:r1])
        dq.mul_(scale)
        dkeys.mul_(scale)
        f_dt, q_dt, k_dt, g_dt, pk_dt, ps_dt = ctx.dtypes
        return (u.to(f_dt), dq.to(q_dt), dkeys[:, P:].to(k_dt), dgamma.to(g_dt),
                None if P == 0 else dkeys[:, :P].to(pk_dt), None if P == 0 else dpast_s.to(ps_dt), None)


def _supports(f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, *, past_k: Tensor | None = None,
              past_s: Tensor | None = None, seq_idx: Tensor | None = None) -> Reason:
    return check_tensors(q, k, past_k, seq_idx, scalars=(f, gamma, past_s))


def _auto(f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, *, past_k: Tensor | None = None, **kwargs) -> Reason:
    if f.shape[1] == 1 and past_k is not None:
        return "one decoding step: a weighted sum over the cache, nothing to solve (pin to force)"
    return auto_check(f, q, k, gamma, past_k=past_k, **kwargs)


def _batch_rows(B: int, L: int) -> int:
    """Sequences solved together: as many as fit one block of BT rows each in BUFFER_BYTES (at least one)."""
    return max(1, min(B, BUFFER_BYTES // (4 * BT * L)))


# Our own kernels: automatic selection waits for kernels.validate() on each device.
@feedback_solve.register("triton", priority=30, probe=triton_probe, supports=_supports, auto=_auto,
                         needs_validation=True)
def feedback_solve_triton(f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, *, past_k: Tensor | None = None,
                          past_s: Tensor | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """f (B, T, D), q, k (B, T, Dk), gamma (B, T), past_k (B, P, Dk), past_s (B, P, D), seq_idx (B, P + T)
    -> s (B, T, D) in f's dtype; contract in kernels.feedback_solve, algorithm in this module's docstring.

    q, k, past_k are multiplied in their dtype (autocast's for float32 inputs under autocast); f, gamma
    and past_s are solved in float32 whatever theirs. Batches whose work buffer would exceed
    BUFFER_BYTES even with one block of rows per group are solved a few sequences at a time."""
    check_inputs(f, q, k, gamma, past_k, past_s, seq_idx)
    work = product_dtype(q)
    q, k, past_k = (None if t is None else t.to(work) for t in (q, k, past_k))
    inputs = (f, q, k, gamma, past_k, past_s, seq_idx)
    step = _batch_rows(f.shape[0], (0 if past_k is None else past_k.shape[1]) + f.shape[1])
    with exact_host_math(f.device):
        parts = [_FeedbackSolveTriton.apply(*(None if t is None else t[i:i + step] for t in inputs))
                 for i in range(0, f.shape[0], step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
