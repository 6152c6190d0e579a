"""`chunked` backend of `linear_attention`: the chunkwise-parallel form of GLA in plain PyTorch.

The sequence is cut into chunks of C steps (padded at the end with steps that change nothing).
With a_t = g_t the log decay (per key channel, or per head) and b_i = a_1 + ... + a_i its sum from
the start of a chunk, the state entering the chunk S0 and the outputs inside it are
    o_i = scale * [ (q_i * exp(b_i)) S0  +  sum_{j<=i} (sum_d q_id k_jd exp(b_id - b_jd)) v_j ]
and the state leaving it is
    S_C = diag(exp(b_C)) S0 + sum_j (k_j * exp(b_C - b_j)) v_j^T.
All chunks' intra-chunk products and state contributions are computed at once; only the (dk, dv)
state is passed from chunk to chunk in a loop (T / C small steps). Memory is O(T * C) per head.

With per-key-channel decays (GLA) the intra-chunk scores sum_d q_id k_jd exp(b_id - b_jd) have a
decay per pair and channel. Two forms:
  * factored (the GLA paper's chunkwise form, arXiv 2312.06635 Section 4.2): exp(b_id - b_jd) =
    exp(b_id) * exp(-b_jd), so the scores are one matmul, (q * exp(b)) (k * exp(-b))^T, masked to
    j <= i in the same segment (b summed without the segment resets there). Used when every
    chunk's total decay, per channel, stays within FACTOR_MAX_LOG_DECAY (checked once per call, one
    host sync; compiled code always takes the pairwise form): then e^-60 <= exp(b) <= 1 <= exp(-b) <= e^60 are normal float32 numbers (no
    underflow), the products stay finite for |q_id k_jd| up to about 1e12 (the masked entries j > i
    are the largest, |q k| e^60), and each kept score term has a relative error of about
    |b| * eps <= 60 * eps (a few eps in the pairwise form).
  * pairwise (always safe): the (C, C, dk) tensor of exp(b_id - b_jd), each a masked sum; the
    chunk is capped at KEY_DECAY_MAX_CHUNK steps (the sub-chunk size of the paper's secondary
    chunking) so that tensor stays 16 * T * dk. Taken when some chunk decays more than the bound.

Numerics: apart from the factored scores above, every decay factor is exp of a sum of log decays
built by masked cumulative sums (kernels.decays), never as a difference, so no factor exceeds 1
and nothing overflows. A step that starts a new segment gets log decay -inf: every factor spanning
the boundary is exactly 0, and the state passed into a chunk that contains a segment start is
replaced, not scaled (torch.where). Half-precision inputs are computed in float32.
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

KEY_DECAY_MAX_CHUNK = 16  # chunk cap of the pairwise per-key-channel form (see the module docstring)
FACTOR_MAX_LOG_DECAY = 60.0  # the factored per-key-channel form needs every chunk's decay >= exp(-60)
AUTO_MIN_T = 16  # shorter inputs go to `reference` under automatic selection (measured: docs/linear_attention.md)


def _auto(q: Tensor, *args, **kwargs) -> str | None:
    """Automatic selection only (pinned, chunked runs anything): decline where `reference` is as fast."""
    if q.shape[1] < AUTO_MIN_T:
        return f"T = {q.shape[1]} < {AUTO_MIN_T}: the token-by-token reference is as fast (pin to force)"
    return None


def _factorable(g: Tensor, C: int) -> bool:
    """Whether every chunk of C steps of the per-key-channel log decay g (B, T, H, dk) sums to at
    least -FACTOR_MAX_LOG_DECAY in every channel (segment resets aside): the factored form's bound."""
    T = g.shape[1]
    total = F.pad(g.detach().float(), (0, 0, 0, 0, 0, (-T) % C)).unflatten(1, (-1, C)).sum(2)  # (B, n, H, dk)
    return bool(total.min() >= -FACTOR_MAX_LOG_DECAY)


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
    starts = segment_starts(seq_idx, B, T, q.device)  # (B, T)
    C = min(chunk_size, T)
    # the bound check is a host sync: compiled graphs take the pairwise form, which needs none
    factored = a.shape[3] > 1 and not torch.compiler.is_compiling() and _factorable(g, C)
    if a.shape[3] > 1 and not factored:
        C = min(C, KEY_DECAY_MAX_CHUNK)
    pad = (-T) % C  # padded steps: no decay, k = v = 0, so the state passes through unchanged
    qc, kc, vc, a = (F.pad(t.to(work), (0, 0, 0, 0, 0, pad)) for t in (q, k, v, a))
    qc, kc, vc = (rearrange(t, "b (n c) h d -> b h n c d", c=C) for t in (qc, kc, vc))
    a = rearrange(a, "b (n c) h e -> b h n e c", c=C)
    starts = rearrange(F.pad(starts, (0, pad)), "b (n c) -> b n c", c=C)
    reset = starts.any(-1)

    # intra-chunk: scores q_i . k_j weighted by the decay from j to i (0 above the diagonal)
    if factored:
        b = a.masked_fill(a == -torch.inf, 0.0).cumsum(-1).mT  # (b, h, n, c, dk), resets left out
        run = starts.cumsum(-1)  # (b, n, c): steps i, j share a segment iff run_i == run_j
        keep = (run[..., :, None] == run[..., None, :]) & torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        scores = ((qc * torch.exp(b)) @ (kc * torch.exp(-b)).mT).masked_fill(~keep[:, None], 0.0)
    elif a.shape[3] == 1:
        scores = (qc @ kc.mT) * torch.exp(segsum(a))[:, :, :, 0]  # (b, h, n, c, c)
    else:
        scores = torch.einsum("bhnid,bhnjd,bhndij->bhnij", qc, kc, torch.exp(segsum(a)))
    o = scores @ vc  # (b, h, n, c, dv)

    # what each chunk adds to the state, and how it reads the state entering it
    q_in = qc * torch.exp(a.cumsum(-1)).mT  # decay from the chunk start to step i
    k_out = kc * torch.exp(decay_to_end(a)).mT  # decay from step j to the chunk end
    added = k_out.mT @ vc  # (b, h, n, dk, dv)
    chunk_decay = torch.exp(a.sum(-1))[..., None]  # (b, h, n, E, 1)

    S = q.new_zeros(B, H, dk, v.shape[3], dtype=work) if initial_state is None else initial_state.to(work)
    entering = []
    # unbind once: indexing chunk n inside the loop would make every backward step fill a gradient
    # buffer as large as all chunks together (O(T^2 / C^2) work)
    for add_n, decay_n, reset_n in zip(added.unbind(2), chunk_decay.unbind(2), reset.unbind(1)):
        entering.append(S)
        S = torch.where(reset_n[:, None, None, None], add_n, decay_n * S + add_n)
    o = scale * (o + q_in @ torch.stack(entering, dim=2))

    o = rearrange(o, "b h n c d -> b (n c) h d")[:, :T].to(q.dtype)
    return (o, S.to(q.dtype)) if return_final_state else o
