"""`chunked` backend of `ssd`: Mamba-2's SSD block decomposition in plain PyTorch.

The sequence is cut into chunks of length L (padded at the end). With a_t = dt_t A the log decay:
  1. intra-chunk (diagonal blocks): y_l += sum_{s<=l} C_l.B_s exp(a_{s+1} + ... + a_l) dt_s x_s
  2. chunk states: what each chunk adds to the state at its end
  3. inter-chunk: states passed from chunk to chunk (initial state first), decayed by chunk totals
  4. state to output: y_l += C_l . (state entering the chunk) exp(a_0 + ... + a_l)
as in the Mamba-2 paper's minimal reference (ssd_minimal.py), with groups kept unexpanded.

Segments (seq_idx): a step that starts a new segment gets log decay -inf, so every product of
decays that spans the boundary is exactly 0. This masks intra-chunk terms across segments and stops
state passing across a boundary (the state entering a segment is 0), which is the op's contract.
All decay sums are built as cumulative sums of masked entries (`segsum`), never as differences of
a cumsum, so -inf never meets -inf in a subtraction and nothing turns into NaN (forward or grads).
Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from kernels.decays import segsum
from kernels.ssd.contract import check_inputs, segment_starts, ssd


def _supports(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int = 64, **kwargs) -> str | None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        return f"chunk_size must be a positive int; got {chunk_size!r}"
    return None


@ssd.register("chunked", priority=10, supports=_supports)
def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
                seq_idx: Tensor | None = None, chunk_size: int = 64, return_final_state: bool = False):
    """SSD by chunks (see module docstring); shapes as in the op contract (kernels.ssd)."""
    check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    Bt, T, H, P = x.shape
    G, N = B.shape[2:]
    work = torch.promote_types(x.dtype, torch.float32)
    L = min(chunk_size, T)
    pad = (-T) % L

    # log decay per step, -inf where a new segment starts: (Bt, T, H)
    a = (dt.to(work) * A.to(work)).masked_fill(segment_starts(seq_idx, Bt, T, x.device)[..., None], -torch.inf)
    xdt = x.to(work) * dt.to(work)[..., None]
    # zero padding at the end: decay 1, no input, so the final state is unchanged
    a, xdt, Bw, Cw = (F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) for t in (a, xdt, B.to(work), C.to(work)))

    X = rearrange(xdt, "b (c l) (g r) p -> b c l g r p", l=L, g=G)
    Bc = rearrange(Bw, "b (c l) g n -> b c l g n", l=L)
    Cc = rearrange(Cw, "b (c l) g n -> b c l g n", l=L)
    a = rearrange(a, "b (c l) (g r) -> b g r c l", l=L, g=G)

    # 1. intra-chunk outputs: (C_l . B_s) * decay(s -> l) on the causal diagonal blocks
    decay = torch.exp(segsum(a))  # (b, g, r, c, l, s)
    # a fresh contiguous copy: einsum's result strides on size-1 dims (G = 1) differ from the ones AOT
    # autograd's fake tensors predict, and the next einsum's traced view then fails (aot_eager)
    scores = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc).clone(memory_format=torch.contiguous_format)
    y = torch.einsum("bgcls,bgrcls,bcsgrp->bclgrp", scores, decay, X)

    # 2. each chunk's contribution to the state at its end: decay(s -> end of chunk) = last row
    states = torch.einsum("bcsgn,bgrcs,bcsgrp->bcgrpn", Bc, decay[..., -1, :], X)

    # 3. pass states across chunks. Index 0 is the initial state, index c+1 chunk c's contribution;
    #    the state entering chunk z is sum_{c<=z} states[c] * decay(chunks c..z-1)
    if initial_state is None:
        init = states.new_zeros(Bt, 1, G, H // G, P, N)
    else:
        init = rearrange(initial_state.to(work), "b (g r) p n -> b 1 g r p n", g=G)
    states = torch.cat([init, states], dim=1)  # (b, c+1, g, r, p, n)
    chunk_decay = torch.exp(segsum(F.pad(a.sum(dim=-1), (1, 0))))  # (b, g, r, c+1, c+1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
    entering, final = states[:, :-1], states[:, -1]

    # 4. state entering each chunk -> outputs, decayed from the chunk start to step l
    y = y + torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", Cc, entering, torch.exp(a.cumsum(dim=-1)))

    y = rearrange(y, "b c l g r p -> b (c l) (g r) p")[:, :T].to(x.dtype)
    if return_final_state:
        return y, rearrange(final, "b g r p n -> b (g r) p n").to(x.dtype)
    return y
