"""`chunked` backend of `feedback_solve`: blocks of C tokens, O(T·C + T·D) memory, own backward.

Notation (one sequence; the batch is carried along). New rows t = 0..T-1 sit at positions P + t
after a cache of P rows; all keys kk = [past_k; k] and all outputs ss = [past_s; s], length P + T.

    l[t, j]  = <q_t, kk_j> / sqrt(Dk)        only for j in the strict past of t (same segment)
    a[t, j]  = softmax_j l[t, j]             alpha; a row with no past is all zeros
    Bf[t, j] = gamma_t a[t, j]
    s_t      = f_t + sum_j Bf[t, j] ss_j      i.e. (I - Bf_N) s = f + Bf_P past_s

with Bf = [Bf_P | Bf_N] split into the columns of the cache and of the new rows (Bf_N is strictly
lower triangular, T x T).

Forward, block i = rows [a, b) (n = b - a <= C), blocks in order:
    1. logits of the block's rows against keys [0, P + b) only: n x (P + b), never the upper
       triangle beyond the block; mask the diagonal block's upper triangle (and other segments);
    2. row-wise softmax over the whole row, which is in memory: the row max and sum are exact and
       computed by one fused kernel (torch.softmax);
    3. rhs = f_blk + gamma_blk * (a[blk, :P + a] @ ss[:P + a])     (cache and earlier blocks)
    4. solve the n x n unit-lower-triangular system (I - Bf[blk, P + a : P + b]) s_blk = rhs.
A row with an empty past gets one placeholder logit (so its softmax is finite) and gain 0 in
steps 3-4 and in the backward pass; that row's s is f and its gradients are exact zeros.

Backward. Given G = dL/ds, let u solve the transposed system (I - Bf_N)^T u = G, i.e.
    u_j = G_j + sum_{t > j} Bf[t, j] u_t.
Because r = f + Bf_P past_s is the right-hand side of M s = r with M = I - Bf_N, dL/dr = u and
dL/dM = -u s^T. With dA[t, j] = <u_t, ss_j> on the visible entries:
    df       = u
    dpast_s  = Bf_P^T u
    dL/dBf   = dA
    dgamma_t = sum_j a[t, j] dA[t, j]
    da[t, j] = gamma_t dA[t, j]
    dl[t, j] = a[t, j] (da[t, j] - sum_j' a[t, j'] da[t, j'])  = gamma_t a[t, j] (dA[t, j] - dgamma_t)
    dq_t     = sum_j dl[t, j] kk_j / sqrt(Dk),     dkk_j = sum_t dl[t, j] q_t / sqrt(Dk)
The transposed solve runs over the blocks from last to first. An accumulator acc (P + T, D) holds
sum over already-processed (later) rows t of Bf[t, j] u_t for every column j. Block i recomputes
a[blk, :P + b] from q and kk (the same fused softmax as the forward pass: each block holds complete
rows, so no saved statistics are needed, and one fused kernel is cheaper than exp(l - lse) in two
eager passes), solves (I - Bf_blk,blk)^T u_blk = G_blk + acc[blk] (upper triangular, n x n), forms
dA, dgamma, dl, dq, dkk for the block, and adds Bf[blk, :P + a]^T u_blk into acc[:P + a]. At the
end acc[:P] is dpast_s, and acc[P:] holds df = u (a block's slot is free once it is solved). The
per-row gains are folded into the small (n x D) operands, never into the n x (P + b) blocks.

Saved for backward: q, kk, gamma and ss (q and k are the caller's tensors unless a dtype cast or a
cache forces a copy): O(T (D + Dk)) per sequence. Working memory of either pass: two or three
n x (P + T) blocks, O(T C). Half-precision inputs are computed in float32 and cast back (gradients
too); forward and backward run in full float32 under autocast and whatever the TF32 / float32-matmul
precision switches say (kernels.precision: the solve amplifies rounding by up to 1 / (1 - gamma)). Cost: about T^2 / 2 (Dk + D) multiply-adds forward and 2.5x that backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.feedback_solve.contract import check_inputs, feedback_solve
from kernels.precision import exact_float32, exact_float32_backward

DEFAULT_CHUNK_SIZE = 128  # measured: `python tools/bench.py layer --chunk-sweep` (docs/feedback_chunked.md)
_chunk_size = DEFAULT_CHUNK_SIZE


def set_chunk_size(chunk_size: int | None) -> None:
    """Set the block size C used when a call does not pass `chunk_size` (None restores the default)."""
    global _chunk_size
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    _chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)


def get_chunk_size() -> int:
    return _chunk_size


def _block_softmax(q_blk: Tensor, keys: Tensor, a: int, P: int, diag_mask: Tensor,
                   seq_idx: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """alpha of rows [a, a + n) against keys [0, P + a + n): (B, n, P + a + n), and the rows with an
    empty strict past (B, n) bool (None when there are none).

    q_blk: (B, n, Dk) already scaled by 1/sqrt(Dk); keys: (B, >= P + a + n, Dk);
    diag_mask: (n, n) bool, True on and above the diagonal (not the strict past).
    An empty row gets one finite logit (column 0), so its softmax is finite; callers zero its gain.
    """
    B, n = q_blk.shape[:2]
    end = P + a + n
    logits = q_blk @ keys[:, :end].mT
    logits[:, :, P + a:].masked_fill_(diag_mask, float("-inf"))
    empty = None
    if seq_idx is not None:
        hidden = seq_idx[:, P + a:end, None] != seq_idx[:, None, :end]  # (B, n, end): another segment
        hidden[:, :, P + a:] |= diag_mask
        logits.masked_fill_(hidden, float("-inf"))
        empty = hidden.all(dim=-1)
        logits[:, :, 0].masked_fill_(empty, 0.0)
    elif P + a == 0:  # the very first row has no past
        empty = torch.zeros(B, n, dtype=torch.bool, device=q_blk.device)
        empty[:, 0] = True
        logits[:, 0, 0] = 0.0
    return torch.softmax(logits, dim=-1), empty


def _gain(g: Tensor, empty: Tensor | None) -> Tensor:
    """Row gains (B, n) -> (B, n, 1), zero on rows with an empty past (their alpha is a placeholder)."""
    return (g if empty is None else g.masked_fill(empty, 0.0))[..., None]


class _FeedbackSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, past_k: Tensor | None,
                past_s: Tensor | None, seq_idx: Tensor | None, chunk_size: int) -> Tensor:
        B, T, D = f.shape
        P = 0 if past_k is None else past_k.shape[1]
        work = torch.promote_types(f.dtype, torch.float32)
        scale = 1.0 / math.sqrt(q.shape[-1])
        qw = q.to(work)
        keys = (k if past_k is None else torch.cat([past_k, k], dim=1)).to(work)
        g = gamma.to(work)
        ss = torch.empty(B, P + T, D, dtype=work, device=f.device)  # [past_s; s]
        if P:
            ss[:, :P] = past_s
        triu = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=f.device).triu()
        for a in range(0, T, chunk_size):
            b = min(a + chunk_size, T)
            alpha, empty = _block_softmax(qw[:, a:b] * scale, keys, a, P, triu[:b - a, :b - a], seq_idx)
            g_blk = _gain(g[:, a:b], empty)
            rhs = f[:, a:b].to(work)
            if P + a:  # cache and earlier blocks
                rhs = torch.addcmul(rhs, g_blk, alpha[:, :, :P + a] @ ss[:, :P + a])
            # unitriangular=True never reads the diagonal, so -(gamma alpha) stands for I - gamma alpha
            ss[:, P + a:P + b] = torch.linalg.solve_triangular(alpha[:, :, P + a:] * -g_blk, rhs, upper=False,
                                                               unitriangular=True)
        s = ss[:, P:] if P else ss
        out = s.to(f.dtype) if P == 0 else s.to(f.dtype, copy=True)
        ctx.save_for_backward(qw, keys, g, ss, seq_idx)
        ctx.meta = (P, chunk_size, scale, f.dtype, q.dtype, k.dtype, gamma.dtype,
                    None if past_k is None else (past_k.dtype, past_s.dtype))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @exact_float32_backward
    def backward(ctx, grad_s: Tensor):
        qw, keys, g, ss, seq_idx = ctx.saved_tensors
        P, chunk_size, scale, f_dtype, q_dtype, k_dtype, gamma_dtype, past_dtypes = ctx.meta
        B, T, Dk = qw.shape
        work = ss.dtype
        G = grad_s.to(work)
        # acc[:, j]: sum over the rows t processed so far (the later ones) of gamma_t alpha[t, j] u_t.
        # Once block [a, b) is solved, acc[:, P + a:P + b] is not needed any more and holds u = df.
        acc = torch.zeros_like(ss)
        dq = torch.empty_like(qw)
        dkeys = torch.zeros_like(keys)
        dgamma = torch.empty_like(g)
        triu = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=G.device).triu()
        for a in reversed(range(0, T, chunk_size)):
            b = min(a + chunk_size, T)
            q_blk = qw[:, a:b] * scale
            alpha, empty = _block_softmax(q_blk, keys, a, P, triu[:b - a, :b - a], seq_idx)
            g_blk = _gain(g[:, a:b], empty)
            diag = alpha[:, :, P + a:] * -g_blk  # -(gamma alpha) on the diagonal block
            u = torch.linalg.solve_triangular(diag.mT, G[:, a:b] + acc[:, P + a:P + b], upper=True,
                                              unitriangular=True)
            acc[:, P + a:P + b] = u
            dA = u @ ss[:, :P + b].mT  # (B, n, P + b): <u_t, ss_j>
            dg = torch.linalg.vecdot(alpha, dA)  # (B, n)
            dgamma[:, a:b] = dg if empty is None else dg.masked_fill(empty, 0.0)
            dl = dA.sub_(dg[..., None]).mul_(alpha)  # dlogits / gamma_t
            dq[:, a:b] = (dl @ keys[:, :P + b]).mul_(g_blk * scale)
            dkeys[:, :P + b].baddbmm_(dl.mT, q_blk * g_blk)
            if P + a:
                acc[:, :P + a].baddbmm_(alpha[:, :, :P + a].mT, u * g_blk)
        grads = [acc[:, P:].to(f_dtype), dq.to(q_dtype), dkeys[:, P:].to(k_dtype), dgamma.to(gamma_dtype)]
        if past_dtypes is None:
            grads += [None, None]
        else:
            grads += [dkeys[:, :P].to(past_dtypes[0]), acc[:, :P].to(past_dtypes[1])]
        return (*grads, None, None)


AUTO_MIN_T = 129  # shorter inputs go to `reference` under automatic selection (docs/feedback_chunked.md)


def _auto(f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, *, past_k: Tensor | None = None, **kwargs) -> str | None:
    """Automatic selection only (pinned, chunked runs anything): decline where `reference` is faster."""
    if f.shape[1] == 1 and past_k is not None:
        return "one decoding step: the reference's weighted sum over the cache is faster (pin to force)"
    if f.shape[1] < AUTO_MIN_T:
        return f"T = {f.shape[1]} < {AUTO_MIN_T}: the dense reference is as small and a little faster (pin to force)"
    return None


@feedback_solve.register("chunked", priority=10, auto=_auto)
def feedback_solve_chunked(f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, *, past_k: Tensor | None = None,
                           past_s: Tensor | None = None, seq_idx: Tensor | None = None,
                           chunk_size: int | None = None) -> Tensor:
    """Blocks of `chunk_size` rows (default `get_chunk_size()`); see the module docstring.

    f (B, T, D), q, k (B, T, Dk), gamma (B, T), past_k (B, P, Dk), past_s (B, P, D), seq_idx (B, P + T)
    -> s (B, T, D) in f's dtype. `chunk_size` is this backend's own knob (not part of the op contract).
    """
    check_inputs(f, q, k, gamma, past_k, past_s, seq_idx)
    chunk_size = _chunk_size if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    with exact_float32(f.device):
        return _FeedbackSolve.apply(f, q, k, gamma, past_k, past_s, seq_idx, chunk_size)
