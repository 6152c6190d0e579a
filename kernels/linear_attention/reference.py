"""`reference` backend of `linear_attention`: the recurrence token by token, the ground truth.

It is also the decoding path: a single step (T = 1) with a state is one update of S.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.linear_attention.contract import check_inputs, linear_attention
from kernels.packing import segment_starts
from kernels.precision import without_autocast


@linear_attention.register("reference", priority=0)
@without_autocast  # the contract computes in float32, under autocast too
def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, scale: float | None = None,
                               initial_state: Tensor | None = None, seq_idx: Tensor | None = None,
                               chunk_size: int = 64, return_final_state: bool = False):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t, one step at a time (see the contract)."""
    check_inputs(q, k, v, g, scale=scale, initial_state=initial_state, seq_idx=seq_idx, chunk_size=chunk_size,
                 return_final_state=return_final_state)
    B, T, H, dk = q.shape
    work = torch.promote_types(q.dtype, torch.float32)
    scale = dk ** -0.5 if scale is None else scale
    qw, kw, vw = q.to(work), k.to(work), v.to(work)
    # decay of S per step, (B, T, H, dk, 1): rows of S are key channels
    decay = None if g is None else torch.exp(g.to(work)).reshape(B, T, H, -1)[..., None]
    starts = segment_starts(seq_idx, B, T, q.device)
    S = q.new_zeros(B, H, dk, v.shape[3], dtype=work) if initial_state is None else initial_state.to(work)
    outs = []
    for t in range(T):
        if decay is not None:
            S = decay[:, t] * S
        S = torch.where(starts[:, t, None, None, None], 0.0, S)  # a new segment starts from S = 0
        S = S + torch.einsum("bhk,bhv->bhkv", kw[:, t], vw[:, t])
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qw[:, t], S))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return (o, S.to(q.dtype)) if return_final_state else o
