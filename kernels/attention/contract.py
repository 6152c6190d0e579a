"""Op `attention`: causal softmax attention with grouped-query heads.

Contract
    attention(q, k, v, *, scale=None, window=None, seq_idx=None, nonfinite_kv=None) -> o
    q: (B, Tq, H, d)   k: (B, S, Hkv, d)   v: (B, S, Hkv, dv)   H % Hkv == 0,  Tq <= S
    o: (B, Tq, H, dv), dtype of q.
    The queries are the last Tq of the S positions (bottom-right aligned, as in a KV cache):
    query i sits at position p = S - Tq + i and sees key j iff j <= p, (window is None or
    p - j < window) and seq_idx[:, j] == seq_idx[:, p]. scale defaults to 1/sqrt(d).
    seq_idx: (B, S) integer segment ids (see kernels.packing), None = one segment.
    Half-precision inputs are computed in float32 by the reference.

NaN policy (kernels.nan_policy, whatever the backend): a non-finite element of q makes its own
output row NaN; one of k or v at step j makes NaN every output row whose query sees j (causal,
window, segment). No other output changes; NaN outputs pass no gradient back, and the non-finite
positions of q, k, v get gradient 0. A decoding cache passes `nonfinite_kv` (B, S) bool, the
key/value steps it knows to be non-finite, with k and v finite everywhere (zeros stored in their
place): the op then neither reads nor copies them for the policy.

Checked on every call (before a backend is chosen; errors name the argument): shapes, q, k, v
floating point on one device, seq_idx integer on that device, window >= 1. With value checks on
(kernels.value_checks): segments contiguous in time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import nan_policy, value_checks
from kernels.checks import check_flags, check_segments, check_tensors
from kernels.dispatch import Op
from kernels.packing import check_contiguous, same_segment


def check_inputs(q: Tensor, k: Tensor, v: Tensor, seq_idx: Tensor | None = None, window: int | None = None) -> None:
    """Shape, dtype and device checks shared by every backend; errors name the argument."""
    check_tensors("attention", dict(q=q, k=k, v=v))
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, T, heads, head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Tq, H, d = q.shape
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H % k.shape[2]:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({k.shape[2]})")
    if Tq > k.shape[1]:
        raise ValueError(f"q has {Tq} steps but k only {k.shape[1]}: queries must be the last steps of the keys")
    check_segments("attention", seq_idx, (B, k.shape[1]), "(B, S)", q.device)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an int >= 1 or None; got {window!r}")


def validate(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, window: int | None = None,
             seq_idx: Tensor | None = None, nonfinite_kv: Tensor | None = None, **backend_options) -> None:
    """Every call's checks (run by the op before dispatch): check_inputs and the NaN-policy hint, plus
    with value checks on (kernels.value_checks) contiguous segments."""
    check_inputs(q, k, v, seq_idx, window)
    check_flags("attention", "nonfinite_kv", nonfinite_kv, k.shape[:2], "(B, S)", q.device)
    if value_checks.active() and seq_idx is not None:
        check_contiguous(seq_idx, "seq_idx")


def nan_guard(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None, seq_idx: Tensor | None = None,
              nonfinite_kv: Tensor | None = None, **options) -> nan_policy.Guarded:
    """The NaN policy (run by the op around every backend): q is read out, k and v are memory seen
    by the queries `visible` lets see them -> cleaned inputs and the function that marks the output."""
    q_bad = nan_policy.flags(q)
    if nonfinite_kv is None:
        kv_bad = nan_policy.flags(k, v)
        k, v = nan_policy.clean(k, kv_bad), nan_policy.clean(v, kv_bad)
    else:  # a cache that stores finite values and knows its flags
        kv_bad = nonfinite_kv
    reached = q_bad | nan_policy.reach_forward(kv_bad, seq_idx, window)[:, k.shape[1] - q.shape[1]:]
    inputs = nan_policy.clean(q, q_bad), k, v
    return inputs, dict(window=window, seq_idx=seq_idx, **options), lambda o: nan_policy.mark(o, reached)


attention = Op("attention", __doc__, check=validate, nan_guard=nan_guard, nan_hints=("nonfinite_kv",))


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
