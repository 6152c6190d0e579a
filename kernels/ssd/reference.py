"""`reference` backend of `ssd`: plain PyTorch, always available, the ground truth."""

from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor

from kernels.ssd.contract import check_inputs, segment_starts, ssd

@ssd.register("reference", priority=0)
def ssd_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
                  seq_idx: Tensor | None = None, chunk_size: int = 64, return_final_state: bool = False):
    """Sequential scan, one step at a time (the ground truth)."""
    check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    Bt, T, H, P = x.shape
    work = torch.promote_types(x.dtype, torch.float32)
    r = H // B.shape[2]
    Bh = repeat(B.to(work), "b t g n -> b t (g r) n", r=r)
    Ch = repeat(C.to(work), "b t g n -> b t (g r) n", r=r)
    decay = torch.exp(dt.to(work) * A.to(work))  # (Bt, T, H)
    keep = (~segment_starts(seq_idx, Bt, T, x.device)).to(work)
    h = x.new_zeros(Bt, H, P, B.shape[3], dtype=work) if initial_state is None else initial_state.to(work)
    ys = []
    for t in range(T):
        h = (decay[:, t] * keep[:, t, None])[..., None, None] * h \
            + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t].to(work), x[:, t].to(work), Bh[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1).to(x.dtype)
    return (y, h.to(x.dtype)) if return_final_state else y
