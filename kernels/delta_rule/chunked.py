"""`chunked` backend of `delta_rule`: the chunkwise WY / UT-transform form in plain PyTorch.

The sequence is cut into chunks of C steps (padded at the end with steps that change nothing).
Inside a chunk, with S0 the state entering it, b_i = g_1 + ... + g_i the log decay from the chunk
start and u_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i) the i-th write (so S_i = exp(g_i) S_{i-1} + k_i u_i^T),
unrolling S_{i-1} gives a unit lower-triangular system for the writes U (DeltaNet, arXiv 2406.06484,
Section 3.2; with decays as in Gated DeltaNet, arXiv 2412.06464, Section 3.3):
    (I + A) U = diag(beta) V - diag(beta exp(b)) K S0,   A_ij = beta_i exp(b_i - b_j) k_i.k_j  (j < i)
so U = U' - W S0 with the "UT transform" (I + A)^-1, found by one triangular solve per chunk and
applied to [diag(beta exp(b)) K | diag(beta) V] (W: the WY representation of the chunk's product of
Householder-like factors). Then
    o = scale * [ (diag(exp(b)) Q - P W) S0 + P U' ],     P_ij = exp(b_i - b_j) q_i.k_j  (j <= i)
    S_C = (exp(b_C) I - Kd^T W) S0 + Kd^T U',              Kd_j = exp(b_C - b_j) k_j
Everything but S0 is computed for a group of chunks at once (batched products, one batched
triangular solve); the loop over the group's chunks only applies S <- M S + dS with the (dk, dk)
matrix M and the (dk, dv) matrix dS of each chunk. Groups hold as many chunks as keep their
temporaries under GROUP_BYTES. Memory is O(T * C) per head (the (C, C) matrices of each chunk) plus
one (dk, dk) matrix per chunk.

Numerics: every decay factor is exp of a sum of log decays built by masked cumulative sums
(kernels.decays), never as a difference, so no factor exceeds 1 and nothing overflows. A step that
starts a new segment gets log decay -inf: every factor spanning the boundary is exactly 0 (so W
has no row that reads the previous segment's state), and the state passed into a chunk that
contains a segment start is replaced, not transformed (torch.where). Half precision runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from kernels.decays import decay_to_end, log_decays, segsum
from kernels.delta_rule.contract import check_inputs, delta_rule
from kernels.packing import segment_starts
from kernels.precision import without_autocast

# Chunks are processed in groups whose (c, c + dk + dv) float temporaries stay under GROUP_BYTES:
# glibc's malloc serves blocks of 32 MiB and more with fresh mmap()s, so every larger temporary
# is page-faulted and zeroed anew on each call, which made a training step at T = 4096 cost well
# over twice the step at T = 2048 with all chunks in one group (docs/delta_rule.md).
GROUP_BYTES = 16 * 2**20
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
    chunks = lambda t: rearrange(_pad_time(t.to(work), pad), "b (n c) h ... -> b h n c ...", c=C)  # noqa: E731
    qc, kc, vc, bc, a = (chunks(t) for t in (q, k, v, beta, a))  # (b, h, n, c, d) and (b, h, n, c)
    reset = None if seq_idx is None else rearrange(  # (b, n): the chunk holds a segment start
        _pad_time(segment_starts(seq_idx, B, T, q.device), pad), "b (n c) -> b n c", c=C).any(-1)

    S = q.new_zeros(B, H, dk, dv, dtype=work) if initial_state is None else initial_state.to(work)
    n = qc.shape[2]
    per_group = max(1, GROUP_BYTES // (B * H * C * (C + dk + dv) * torch.finfo(work).bits // 8))
    outputs = []
    for i in range(0, n, per_group):
        part = slice(i, i + per_group)
        o, S = _chunk_group(qc[:, :, part], kc[:, :, part], vc[:, :, part], bc[:, :, part], a[:, :, part],
                            None if reset is None else reset[:, part], S, scale)
        outputs.append(o)

    o = rearrange(torch.cat(outputs, dim=2), "b h n c d -> b (n c) h d")[:, :T].to(q.dtype)
    return (o, S.to(q.dtype)) if return_final_state else o


def _chunk_group(qc: Tensor, kc: Tensor, vc: Tensor, bc: Tensor, a: Tensor, reset: Tensor | None, S: Tensor,
                 scale: float) -> tuple[Tensor, Tensor]:
    """Consecutive chunks (b, h, n, c, .) entered with state S (b, h, dk, dv) -> their outputs
    (b, h, n, c, dv) and the state after them (see the module docstring); reset (b, n) or None."""
    B, H, _, C, dk = qc.shape
    dv = vc.shape[-1]
    decay = torch.exp(segsum(a))  # (b, h, n, c, c): exp(b_i - b_j) for j <= i, else 0
    from_start = torch.exp(a.cumsum(-1))[..., None]  # (b, h, n, c, 1): exp(b_i)
    to_end = torch.exp(decay_to_end(a))[..., None]  # exp(b_C - b_j)

    # one product for both score matrices: [Q; K] K^T -> (b, h, n, 2c, c)
    QK, KK = (torch.cat([qc, kc], dim=-2) @ kc.mT).split(C, dim=-2)
    # UT transform: T_inv = (I + A)^-1 with A strictly lower (one triangular solve of C columns),
    # then [W | U'] = T_inv [diag(beta exp(b)) K | diag(beta) V]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril(-1)
    A = torch.where(strictly_lower, bc[..., None] * decay * KK, 0.0)
    eye_c = torch.eye(C, dtype=qc.dtype, device=qc.device).expand_as(A)
    T_inv = torch.linalg.solve_triangular(A, eye_c, upper=False, unitriangular=True)
    WU = T_inv @ (bc[..., None] * torch.cat([from_start * kc, vc], dim=-1))  # (b, h, n, c, dk + dv): [W | U']

    P = decay * QK  # (b, h, n, c, c), causal (decay is 0 above the diagonal)
    PW, o = (P @ WU).split([dk, dv], dim=-1)
    reads = from_start * qc - PW  # (b, h, n, c, dk): how the outputs read the entering state
    KdW, added = ((to_end * kc).mT @ WU).split([dk, dv], dim=-1)  # Kd_j = exp(b_C - b_j) k_j
    eye = torch.eye(dk, dtype=qc.dtype, device=qc.device)
    M = torch.exp(a.sum(-1))[..., None, None] * eye - KdW  # (b, h, n, dk, dk); added: (b, h, n, dk, dv)

    S = rearrange(S, "b h k v -> (b h) k v")
    M, added = (rearrange(t, "b h n k v -> n (b h) k v") for t in (M, added))
    keep = None if reset is None else repeat(~reset, "b n -> n (b h) 1 1", h=H)
    entering = []
    # unbind once: indexing chunk n inside the loop would make every backward step fill a gradient
    # buffer as large as all chunks together (O(T^2 / C^2) work)
    for n, (M_n, add_n) in enumerate(zip(M.unbind(0), added.unbind(0))):
        entering.append(S)
        # a chunk holding a segment start replaces the state (its W rows never read the old one)
        S = torch.baddbmm(add_n, M_n, S) if keep is None else torch.where(keep[n], torch.baddbmm(add_n, M_n, S), add_n)
    entering = rearrange(torch.stack(entering), "n (b h) k v -> b h n k v", b=B)
    o = scale * torch.baddbmm(o.flatten(0, 2), reads.flatten(0, 2), entering.flatten(0, 2)).view_as(o)
    return o, rearrange(S, "(b h) k v -> b h k v", b=B)


def _pad_time(t: Tensor, pad: int) -> Tensor:
    """t (B, T, ...) padded with `pad` zero steps at the end (no copy when pad = 0)."""
    return t if pad == 0 else F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad))
