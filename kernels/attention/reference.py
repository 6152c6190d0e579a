"""`reference` backend of `attention`: plain PyTorch, always available, the ground truth."""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat
from torch import Tensor

from kernels.attention.contract import attention, check_inputs, visible

@attention.register("reference", priority=0)
def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                        window: int | None = None, seq_idx: Tensor | None = None) -> Tensor:
    check_inputs(q, k, v, seq_idx, window)
    B, Tq, H, d = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)
    qh = rearrange(q.to(work), "b t h d -> b h t d")
    kh = repeat(k.to(work), "b s g d -> b (g r) s d", r=H // Hkv)
    vh = repeat(v.to(work), "b s g d -> b (g r) s d", r=H // Hkv)
    logits = torch.einsum("bhtd,bhsd->bhts", qh, kh) * scale
    mask = visible(Tq, S, q.device, window, seq_idx)[:, None]
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    out = torch.einsum("bhts,bhsd->bhtd", weights, vh)
    return rearrange(out, "b h t d -> b t h d").to(q.dtype)
