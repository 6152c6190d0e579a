"""`chunked` backend of `delta_rule`: the chunkwise WY / UT-transform form in plain PyTorch.

The sequence is cut into chunks of C steps (padded at the end with steps that change nothing).
Inside a chunk, with S0 the state entering it, b_i = g_1 + ... + g_i the log decay from the chunk
start and u_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i) the i-th write (so S_i = exp(g_i) S_{i-1} + k_i u_i^T),
unrolling S_{i-1} gives a unit lower-triangular system for the writes U (DeltaNet, arXiv 2406.06484,
Section 3.2; with decays as in Gated DeltaNet, arXiv 2412.06464, Section 3.3):
    (I + A) U = diag(beta) V - diag(beta exp(b)) K S0,   A_ij = beta_i exp(b_i - b_j) k_i.k_j  (j < i)
so U = U' - W S0 with the "UT transform" (I + A)^-1 applied once per chunk to [diag(beta exp(b)) K | diag(beta) V]
(W: the WY representation of the chunk's product of Householder-like factors). Then
    o = scale * [ (diag(exp(b)) Q - P W) S0 + P U' ],     P_ij = exp(b_i - b_j) q_i.k_j  (j <= i)
    S_C = (exp(b_C) I - Kd^T W) S0 + Kd^T U',              Kd_j = exp(b_C - b_j) k_j
Everything but S0 is computed for all chunks at once (one batched triangular solve); the loop over
chunks only applies S <- M S + dS with the (dk, dk) matrix M and the (dk, dv) matrix dS of each chunk.
Memory is O(T * C) per head (the (C, C) matrices of each chunk) plus one (dk, dk) matrix per chunk.

Numerics: every decay factor is exp of a sum of log decays built by masked cumulative sums
(kernels.decays), never as a difference, so no factor exceeds 1 and nothing overflows. A step that
starts a new segment gets log decay -inf: every factor spanning the boundary is exactly 0 (so W
has no row that reads the previous segment's state), and the state passed into a chunk that
contains a segment start is replaced, not transformed (torch.where). Half precision runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from kernels.decays import decay_to_end, log_decays, segsum
from kernels.delta_rule.contract import check_inputs, delta_rule
from kernels.packing import segment_starts
from kernels.precision import without_autocast

AUTO_MIN_T = 16  # shorter inputs go to `reference` under automatic selection (measured: docs/delta_rule.md)


def _auto(q: Tensor, *args, **kwargs) -> str | None:
    """Automatic selection only (pinned, chunked runs anything): decline where `reference` is as fast."""
    if q.shape[1] < AUTO_MIN_T:
        return f"T = {q.shape[1]} < {AUTO_MIN_T}: the token-by-token reference is as fast (pin to force)"
    return None


@delta_rule.register("chunked", priority=10, auto=_auto)
@without_autocast  # the contract computes in float32, under autocast too
def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
                       scale: float | None = None, initial_state: Tensor | None = None,
                       seq_idx: Tensor | None = None, chunk_size: int = 64, return_final_state: bool = False):
    """Chunks of `chunk_size` steps (see the module docstring); shapes as in the op contract."""
    check_inputs(q, k, v, beta, g, scale=scale, initial_state=initial_state, seq_idx=seq_idx, chunk_size=chunk_size,
                 return_final_state=return_final_state)
    B, T, H, dk = q.shape
    dv = v.shape[3]
    work = torch.promote_types(q.dtype, torch.float32)
    scale = dk ** -0.5 if scale is None else scale
    C = min(chunk_size, T)
    pad = (-T) % C  # padded steps: no decay, beta = k = v = 0, so the state passes through unchanged

    a = log_decays(g, seq_idx, (B, T, H), work, q.device)[..., 0]  # (B, T, H)
    qc, kc, vc = (rearrange(F.pad(t.to(work), (0, 0, 0, 0, 0, pad)), "b (n c) h d -> b h n c d", c=C) for t in (q, k, v))
    bc, a = (rearrange(F.pad(t.to(work), (0, 0, 0, pad)), "b (n c) h -> b h n c", c=C) for t in (beta, a))
    reset = rearrange(F.pad(segment_starts(seq_idx, B, T, q.device), (0, pad)), "b (n c) -> b n c", c=C).any(-1)

    decay = torch.exp(segsum(a))  # (b, h, n, c, c): exp(b_i - b_j) for j <= i, else 0
    from_start = torch.exp(a.cumsum(-1))[..., None]  # (b, h, n, c, 1): exp(b_i)
    to_end = torch.exp(decay_to_end(a))[..., None]  # exp(b_C - b_j)

    # UT transform: solve (I + A) [W | U'] = [diag(beta exp(b)) K | diag(beta) V] (A strictly lower)
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    A = torch.where(strictly_lower, bc[..., None] * decay * (kc @ kc.mT), 0.0)
    rhs = torch.cat([bc[..., None] * from_start * kc, bc[..., None] * vc], dim=-1)
    W, U = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([dk, dv], dim=-1)

    P = decay * (qc @ kc.mT)  # (b, h, n, c, c), causal (decay is 0 above the diagonal)
    reads = from_start * qc - P @ W  # (b, h, n, c, dk): how the outputs read the entering state
    o = P @ U  # (b, h, n, c, dv): the outputs' part that does not depend on the entering state
    Kd = to_end * kc
    eye = torch.eye(dk, dtype=work, device=q.device)
    M = torch.exp(a.sum(-1))[..., None, None] * eye - Kd.mT @ W  # (b, h, n, dk, dk)
    added = Kd.mT @ U  # (b, h, n, dk, dv)

    S = q.new_zeros(B, H, dk, dv, dtype=work) if initial_state is None else initial_state.to(work)
    entering = []
    # unbind once: indexing chunk n inside the loop would make every backward step fill a gradient
    # buffer as large as all chunks together (O(T^2 / C^2) work)
    for M_n, add_n, reset_n in zip(M.unbind(2), added.unbind(2), reset.unbind(1)):
        entering.append(S)
        S = torch.where(reset_n[:, None, None, None], add_n, M_n @ S + add_n)
    o = scale * (o + reads @ torch.stack(entering, dim=2))

    o = rearrange(o, "b h n c d -> b (n c) h d")[:, :T].to(q.dtype)
    return (o, S.to(q.dtype)) if return_final_state else o
