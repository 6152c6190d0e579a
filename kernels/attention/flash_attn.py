"""`flash_attn` backend of `attention`: FlashAttention-2 (`pip install flash-attn`, CUDA builds only).

Written against flash-attn 2.3 - 2.8 (`flash_attn_func`, `flash_attn_varlen_func`; 2.3 added
`window_size`). How the op's contract maps onto it (flash-attn's docstrings):
  * causal masks are aligned to the bottom-right corner, as the op's queries are the last Tq of
    the S keys: `causal=True` (a single query then sees every key);
  * k / v with fewer heads than q are grouped-query attention (query head h reads kv head
    h // (H / Hkv), the op's grouping);
  * a window keeps keys [p - window_size[0], p + window_size[1]] for query position p: the op's
    `p - j < window` is `window_size=(window - 1, 0)`;
  * seq_idx: `flash_attn_varlen_func` on one block per (row, segment that holds queries), from
    kernels.packing.segment_blocks (segment lengths on the host: one device sync per call); keys of
    segments that end before the queries start are dropped.
Declines (with reasons): CPU tensors, float32 / float64, q and v head dims that differ or exceed 256,
GPUs below compute capability 8.0.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from kernels.attention.contract import attention, check_inputs
from kernels.dispatch import module_probe
from kernels.packing import segment_blocks, varlen_keys

MAX_HEAD_DIM = 256
_probe = module_probe("flash_attn", cuda=True, requirement="flash-attn>=2.3,<3")


def _supports(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, window: int | None = None,
              seq_idx: Tensor | None = None) -> str | None:
    if not q.device.type == k.device.type == v.device.type == "cuda":
        return f"needs CUDA tensors; got {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} not supported (float16 and bfloat16 only)"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if v.shape[-1] != q.shape[-1]:
        return f"needs equal q and v head dims; got {q.shape[-1]} and {v.shape[-1]}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim > {MAX_HEAD_DIM} not supported (got {q.shape[-1]})"
    if torch.cuda.get_device_properties(q.device).major < 8:
        return "needs a GPU of compute capability >= 8.0"
    return None


@attention.register("flash_attn", priority=25, probe=_probe, supports=_supports)
def attention_flash_attn(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                         window: int | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """q (B, Tq, H, d), k (B, S, Hkv, d), v (B, S, Hkv, d) -> (B, Tq, H, d); contract in kernels.attention."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    check_inputs(q, k, v, seq_idx, window)
    B, Tq = q.shape[:2]
    S = k.shape[1]
    window_size = (window - 1, 0) if window is not None and window < S else (-1, -1)
    if seq_idx is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=window_size)
    q_lens, kv_lens, kv_starts = segment_blocks(seq_idx, Tq)
    cu = lambda lens: torch.tensor([0, *lens], device=q.device).cumsum(0).to(torch.int32)  # noqa: E731
    out = flash_attn_varlen_func(rearrange(q, "b t h d -> (b t) h d"), varlen_keys(k, kv_starts),
                                 varlen_keys(v, kv_starts), cu(q_lens), cu(kv_lens), max(q_lens), max(kv_lens),
                                 softmax_scale=scale, causal=True, window_size=window_size)
    return rearrange(out, "(b t) h d -> b t h d", b=B)
