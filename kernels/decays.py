"""Log-space decay sums shared by the chunked scan backends (ssd, linear_attention, delta_rule).

A scan with per-step log decays a_t <= 0 multiplies a state by exp(a_{j+1} + ... + a_i) between
steps j and i. Computing that sum as a difference of one cumulative sum, cs_i - cs_j, loses
precision once |cs| is large and turns into NaN (-inf - -inf) when a step has a_t = -inf (the
segment reset the backends use). Every helper here builds its sums as cumulative sums of masked
entries instead: no subtraction, so -inf entries stay -inf and exp() of them is exactly 0, in the
forward pass and in the gradients. No result is ever positive, so exp() never overflows.
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor

from kernels.packing import segment_starts


def segsum(a: Tensor) -> Tensor:
    """a (..., L) -> (..., L, L) with [i, j] = a_{j+1} + ... + a_i for j <= i and -inf above the diagonal.

    Stable form of the Mamba-2 minimal reference: masked cumsum, no subtraction (entries may be -inf).
    """
    L = a.shape[-1]
    a = repeat(a, "... i -> ... i j", j=L)
    strictly_lower = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)
    a = a.masked_fill(~strictly_lower, 0.0)
    out = a.cumsum(dim=-2)
    return out.masked_fill(~strictly_lower.logical_or(torch.eye(L, dtype=torch.bool, device=a.device)), -torch.inf)


def decay_to_end(a: Tensor) -> Tensor:
    """a (..., L) -> (..., L) with [j] = a_{j+1} + ... + a_{L-1} (0 for the last step): the log decay
    from step j to the end of its chunk, as a reversed cumulative sum (no subtraction)."""
    return torch.cat([a[..., 1:].flip(-1).cumsum(-1).flip(-1), torch.zeros_like(a[..., :1])], dim=-1)


def log_decays(g: Tensor | None, seq_idx: Tensor | None, shape: tuple[int, int, int], dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """Per-step log decays (B, T, H, E) in `dtype` with -inf where a segment starts.

    g: (B, T, H, E) or (B, T, H) (-> E = 1) or None (no decay: zeros, E = 1); shape = (B, T, H).
    A step that starts a new segment (seq_idx changes; never step 0) gets -inf: the state before it
    is multiplied by exp(-inf) = 0, i.e. dropped, which is the reset every op's contract states.
    """
    B, T, H = shape
    a = torch.zeros(B, T, H, 1, dtype=dtype, device=device) if g is None else g.to(dtype)
    if a.ndim == 3:
        a = a[..., None]
    if seq_idx is None:
        return a
    return a.masked_fill(segment_starts(seq_idx, B, T, device)[:, :, None, None], -torch.inf)
