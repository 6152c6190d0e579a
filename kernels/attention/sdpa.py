"""`sdpa` backend of `attention`: torch.nn.functional.scaled_dot_product_attention.

PyTorch picks its own kernel (flash, memory-efficient, cuDNN or math) for the inputs. How the op's
masking maps onto it:
  * Tq == S, no window, no seq_idx: `is_causal=True` (top-left and bottom-right alignment agree),
    no mask tensor, so the flash kernels stay eligible;
  * Tq == 1, no window, no seq_idx (one decoding step): no mask at all, the query sees every key;
  * otherwise (queries that are the last Tq < S steps, a sliding window, segments): a boolean mask
    (B or 1, 1, Tq, S) built by `kernels.attention.visible`.
Grouped-query heads use `enable_gqa=True` when there is no mask; with a mask k/v are repeated to
H heads first, because PyTorch's memory-efficient kernel takes masks but not `enable_gqa` (it would
fall back to the math kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from kernels.attention.contract import attention, check_inputs, visible


def _supports(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> str | None:
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        return f"needs floating-point q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if not q.device == k.device == v.device:
        return f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}"
    return None


@attention.register("sdpa", priority=10, supports=_supports)
def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                   window: int | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """q (B, Tq, H, d), k (B, S, Hkv, d), v (B, S, Hkv, dv) -> (B, Tq, H, dv); contract in kernels.attention."""
    check_inputs(q, k, v, seq_idx, window)
    Tq, H = q.shape[1], q.shape[2]
    S, Hkv = k.shape[1], k.shape[2]
    if window is not None and window >= S:
        window = None  # every visible key is within the window anyway
    qh, kh, vh = (rearrange(t, "b s h d -> b h s d") for t in (q, k, v))

    mask = None
    if window is not None or seq_idx is not None or 1 < Tq < S:
        mask = visible(Tq, S, q.device, window, seq_idx)[:, None]  # (B or 1, 1, Tq, S)
        if H != Hkv:
            kh, vh = (repeat(t, "b g s d -> b (g r) s d", r=H // Hkv) for t in (kh, vh))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None and Tq == S > 1,
                                         scale=scale, enable_gqa=kh.shape[1] != H)
    return rearrange(out, "b h t d -> b t h d")
