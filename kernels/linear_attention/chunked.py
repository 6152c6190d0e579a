"""`chunked` backend of `linear_attention`: the chunkwise-parallel form of GLA in plain PyTorch.

The sequence is cut into chunks of C steps (padded at the end with steps that change nothing).
With a_t = g_t the log decay (per key channel, or per head) and b_i = a_1 + ... + a_i its sum from
the start of a chunk, the state entering the chunk S0 and the outputs inside it are
    o_i = scale * [ (q_i * exp(b_i)) S0  +  sum_{j<=i} (sum_d q_id k_jd exp(b_id - b_jd)) v_j ]
and the state leaving it is
    S_C = diag(exp(b_C)) S0 + sum_j (k_j * exp(b_C - b_j)) v_j^T.
All chunks' intra-chunk products and state contributions are computed at once; only the (dk, dv)
state is passed from chunk to chunk in a loop (T / C small steps). Memory is O(T * C) per head.
With per-key-channel decays the intra-chunk scores need exp(b_id - b_jd) for every pair and
channel, a (C, C, dk) tensor per chunk: there the chunk is capped at KEY_DECAY_MAX_CHUNK steps
(the sub-chunk size of the GLA paper's secondary chunking), so that tensor stays 16 * T * dk.

Numerics: every decay factor is exp of a sum of log decays built by masked cumulative sums
(kernels.decays), never as a difference, so no factor exceeds 1 and nothing overflows. A step that
starts a new segment gets log decay -inf: every factor spanning the boundary is exactly 0, and the
state passed into a chunk that contains a segment start is replaced, not scaled (torch.where).
Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from kernels.decays import decay_to_end, log_decays, segsum
from kernels.linear_attention.contract import check_inputs, linear_attention
from kernels.packing import segment_starts
from kernels.precision import without_autocast

KEY_DECAY_MAX_CHUNK = 16  # chunk cap with per-key-channel decays (see the module docstring)
AUTO_MIN_T = 16  # shorter inputs go to `reference` under automatic selection (measured: docs/linear_attention.md)


def _auto(q: Tensor, *args, **kwargs) -> str | None:
    """Automatic selection only (pinned, chunked runs anything): decline where `reference` is as fast."""
    if q.shape[1] < AUTO_MIN_T:
        return f"T = {q.shape[1]} < {AUTO_MIN_T}: the token-by-token reference is as fast (pin to force)"
    return None


@linear_attention.register("chunked", priority=10, auto=_auto)
@without_autocast  # the contract computes in float32, under autocast too
def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, scale: float | None = None,
                             initial_state: Tensor | None = None, seq_idx: Tensor | None = None,
                             chunk_size: int = 64, return_final_state: bool = False):
    """Chunks of `chunk_size` steps (see the module docstring); shapes as in the op contract."""
    check_inputs(q, k, v, g, scale=scale, initial_state=initial_state, seq_idx=seq_idx, chunk_size=chunk_size,
                 return_final_state=return_final_state)
    B, T, H, dk = q.shape
    work = torch.promote_types(q.dtype, torch.float32)
    scale = dk ** -0.5 if scale is None else scale
    a = log_decays(g, seq_idx, (B, T, H), work, q.device)  # (B, T, H, E), E = dk or 1
    C = min(chunk_size, T, KEY_DECAY_MAX_CHUNK if a.shape[3] > 1 else T)
    pad = (-T) % C  # padded steps: no decay, k = v = 0, so the state passes through unchanged
    qc, kc, vc, a = (F.pad(t.to(work), (0, 0, 0, 0, 0, pad)) for t in (q, k, v, a))
    qc, kc, vc = (rearrange(t, "b (n c) h d -> b h n c d", c=C) for t in (qc, kc, vc))
    a = rearrange(a, "b (n c) h e -> b h n e c", c=C)
    reset = rearrange(F.pad(segment_starts(seq_idx, B, T, q.device), (0, pad)), "b (n c) -> b n c", c=C).any(-1)

    # intra-chunk: scores q_i . k_j weighted by the decay from j to i (0 above the diagonal)
    decay = torch.exp(segsum(a))  # (b, h, n, E, c, c)
    if decay.shape[3] == 1:
        scores = (qc @ kc.mT) * decay[:, :, :, 0]
    else:
        scores = torch.einsum("bhnid,bhnjd,bhndij->bhnij", qc, kc, decay)
    o = scores @ vc  # (b, h, n, c, dv)

    # what each chunk adds to the state, and how it reads the state entering it
    q_in = qc * torch.exp(a.cumsum(-1)).mT  # decay from the chunk start to step i
    k_out = kc * torch.exp(decay_to_end(a)).mT  # decay from step j to the chunk end
    added = k_out.mT @ vc  # (b, h, n, dk, dv)
    chunk_decay = torch.exp(a.sum(-1))[..., None]  # (b, h, n, E, 1)

    S = q.new_zeros(B, H, dk, v.shape[3], dtype=work) if initial_state is None else initial_state.to(work)
    entering = []
    for n in range(a.shape[2]):
        entering.append(S)
        S = torch.where(reset[:, n, None, None, None], added[:, :, n], chunk_decay[:, :, n] * S + added[:, :, n])
    o = scale * (o + q_in @ torch.stack(entering, dim=2))

    o = rearrange(o, "b h n c d -> b (n c) h d")[:, :T].to(q.dtype)
    return (o, S.to(q.dtype)) if return_final_state else o
