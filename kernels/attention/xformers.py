"""`xformers` backend of `attention`: xformers.ops.memory_efficient_attention (CUDA only).

xformers is imported lazily inside the functions, so this module imports fine on any machine; the
availability probe reports "xformers not installed" or "needs CUDA".

The op's masking becomes one of xformers' attention biases (`xformers.ops.fmha.attn_bias`):
  * no seq_idx: `LowerTriangularFromBottomRightMask` (queries are the last Tq of S keys), made
    local with `make_local_attention(window)` for a sliding window; none at all for a single query;
  * seq_idx: the batch is flattened into one row of blocks, one per (row, segment), with
    `BlockDiagonalCausalFromBottomRightMask` (`make_local_attention_from_bottomright(window)` for a
    window). Segments that end before the queries start have no queries: their keys are dropped.
    This needs the segment lengths on the host (one device sync per call).
Grouped-query heads: without gradients k/v are expanded (stride 0) to xformers' 5-D [B, M, G, H, K]
layout; xformers has no backward for that layout, so with gradients k/v are repeated to H heads.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor

from kernels.attention.contract import attention, check_inputs
from kernels.dispatch import module_probe
from kernels.packing import segment_blocks, varlen_keys

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _window(window: int | None, S: int) -> int | None:
    """The window, or None when it cannot hide any key (window >= S)."""
    return window if window is not None and window < S else None


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _supports(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, window: int | None = None,
              seq_idx: Tensor | None = None) -> str | None:
    if q.device.type != "cuda" or k.device.type != "cuda" or v.device.type != "cuda":
        return f"needs CUDA tensors; got {q.device.type}"
    if q.dtype not in DTYPES:
        return f"{q.dtype} not supported (float16, bfloat16, float32 only)"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dtype == torch.float32 and _window(window, k.shape[1]) is not None and _needs_grad(q, k, v):
        return "no float32 backward with a sliding window in xformers (flash needs half precision)"
    return None


def layout(q: Tensor, k: Tensor, v: Tensor, window: int | None = None, seq_idx: Tensor | None = None):
    """The xformers inputs for the op's inputs: (q, k, v, attn_bias), and whether the batch was flattened.

    With seq_idx the returned tensors are one row: q (1, B*Tq, H, d), k/v (1, sum of kept keys, Hkv, .).
    """
    from xformers.ops.fmha import attn_bias as xb

    B, Tq = q.shape[:2]
    S = k.shape[1]
    window = _window(window, S)
    if seq_idx is None:
        if window is not None:
            return q, k, v, xb.LowerTriangularFromBottomRightLocalAttentionMask(window), False
        return q, k, v, (None if Tq == 1 else xb.LowerTriangularFromBottomRightMask()), False

    q_lens, kv_lens, kv_starts = segment_blocks(seq_idx, Tq)
    bias = xb.BlockDiagonalCausalFromBottomRightMask.from_seqlens(q_lens, kv_lens, device=q.device)
    if window is not None:
        bias = bias.make_local_attention_from_bottomright(window)
    q = rearrange(q, "b t h d -> 1 (b t) h d")
    k, v = (varlen_keys(t, kv_starts)[None] for t in (k, v))
    return q, k, v, bias, True


@attention.register("xformers", priority=20, probe=module_probe("xformers", cuda=True), supports=_supports)
def attention_xformers(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                       window: int | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """q (B, Tq, H, d), k (B, S, Hkv, d), v (B, S, Hkv, dv) -> (B, Tq, H, dv); contract in kernels.attention."""
    from xformers.ops import memory_efficient_attention

    check_inputs(q, k, v, seq_idx, window)
    B, Tq, H = q.shape[:3]
    Hkv = k.shape[2]
    xq, xk, xv, bias, flat = layout(q, k, v, window, seq_idx)
    r = H // Hkv
    if r == 1:
        out = memory_efficient_attention(xq, xk, xv, attn_bias=bias, scale=scale)
    elif _needs_grad(q, k, v):
        xk, xv = (repeat(t, "b s g d -> b s (g r) d", r=r) for t in (xk, xv))
        out = memory_efficient_attention(xq, xk, xv, attn_bias=bias, scale=scale)
    else:
        xq = rearrange(xq, "b t (g r) d -> b t g r d", r=r)
        xk, xv = (rearrange(t, "b s g d -> b s g 1 d").expand(-1, -1, -1, r, -1) for t in (xk, xv))
        out = rearrange(memory_efficient_attention(xq, xk, xv, attn_bias=bias, scale=scale), "b t g r d -> b t (g r) d")
    if flat:
        out = rearrange(out, "1 (b t) h d -> b t h d", b=B)
    return out
