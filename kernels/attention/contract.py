"""Op `attention`: causal softmax attention with grouped-query heads.

Contract
    attention(q, k, v, *, scale=None, window=None, seq_idx=None) -> o
    q: (B, Tq, H, d)   k: (B, S, Hkv, d)   v: (B, S, Hkv, dv)   H % Hkv == 0,  Tq <= S
    o: (B, Tq, H, dv), dtype of q.
    The queries are the last Tq of the S positions (bottom-right aligned, as in a KV cache):
    query i sits at position p = S - Tq + i and sees key j iff j <= p, (window is None or
    p - j < window) and seq_idx[:, j] == seq_idx[:, p]. scale defaults to 1/sqrt(d).
    seq_idx: (B, S) integer segment ids (see kernels.packing), None = one segment.
    Half-precision inputs are computed in float32 by the reference.

Checked on every call (before a backend is chosen; errors name the argument): shapes, q, k, v
floating point on one device, seq_idx integer on that device, window >= 1. With value checks on
(kernels.value_checks): segments contiguous in time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import value_checks
from kernels.dispatch import Op
from kernels.packing import check_contiguous, check_seq_idx, same_segment


def check_inputs(q: Tensor, k: Tensor, v: Tensor, seq_idx: Tensor | None = None, window: int | None = None) -> None:
    """Shape, dtype and device checks shared by every backend; errors name the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor; got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, T, heads, head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Tq, H, d = q.shape
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % k.shape[2]:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({k.shape[2]})")
    if Tq > k.shape[1]:
        raise ValueError(f"q has {Tq} steps but k only {k.shape[1]}: queries must be the last steps of the keys")
    if seq_idx is not None:
        check_seq_idx(seq_idx, (B, k.shape[1]), "(B, S)", contiguous=False)
        if seq_idx.device != q.device:
            raise ValueError(f"attention: seq_idx is on {seq_idx.device} but q is on {q.device}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an int >= 1 or None; got {window!r}")


def validate(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, window: int | None = None,
             seq_idx: Tensor | None = None, **backend_options) -> None:
    """Every call's checks (run by the op before dispatch): check_inputs, plus with value checks
    on (kernels.value_checks) contiguous segments."""
    check_inputs(q, k, v, seq_idx, window)
    if value_checks.active() and seq_idx is not None:
        check_contiguous(seq_idx, "seq_idx")


attention = Op("attention", __doc__, check=validate)


def visible(Tq: int, S: int, device: torch.device, window: int | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """Bool mask (B or 1, Tq, S): which keys each query may see."""
    p = torch.arange(S - Tq, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    mask = j <= p
    if window is not None:
        mask = mask & (p - j < window)
    mask = mask[None]
    if seq_idx is not None:
        mask = mask & same_segment(seq_idx[:, S - Tq:], seq_idx)
    return mask
