"""Op `feedback_solve`: Sessa's feedback path, the unit-lower-triangular solve (I - B_fb) s = f.

Contract
    feedback_solve(f, q, k, gamma, *, past_k=None, past_s=None, seq_idx=None, nonfinite_past=None) -> s
    f: (B, T, D) forward-branch output     q, k: (B, T, Dk) feedback queries / keys (one head)
    gamma: (B, T) per-token gain           past_k, past_s: (B, P, Dk), (B, P, D) a decoding cache
    seq_idx: (B, P + T) segment ids (kernels.packing), None = one segment
    s: (B, T, D), dtype of f.

With all keys kk = [past_k; k], all outputs ss = [past_s; s] and new row t at position P + t,
    alpha[t, j] = softmax over {j < P + t, same segment} of <q_t, kk_j> / sqrt(Dk)   (empty row -> 0)
    s_t = f_t + gamma_t * sum_j alpha[t, j] ss_j
i.e. forward substitution of (I - gamma * alpha) s = f. Row 0 of a segment has no past: s = f.
Half-precision inputs are solved in float32 and cast back. (I - B_fb)^-1 is never formed.

NaN policy (kernels.nan_policy, whatever the backend): every input is memory. A non-finite
element of f, q, k or gamma at new row t, or of past_k or past_s at cached row j, makes NaN that
row and every later new row of its segment (s_t feeds every later row). No other row changes;
NaN rows pass no gradient back, and non-finite positions get gradient 0. A decoding cache passes
`nonfinite_past` (B, P) bool, the cached rows it knows to be non-finite, with past_k and past_s
finite everywhere (zeros stored in their place): the op then neither reads nor copies them for
the policy.

Checked on every call (before a backend is chosen; errors name the argument): shapes, floating
point tensors on one device, integer seq_idx on that device. With value checks on
(kernels.value_checks): |gamma| < 1 (the solve is only stable, and Sessa's bound only holds, for
gains inside the unit interval) and segments contiguous in time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels import nan_policy, value_checks
from kernels.checks import check_flags, check_segments, check_tensors, check_values
from kernels.dispatch import Op
from kernels.packing import check_contiguous, same_segment


def check_inputs(f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, past_k: Tensor | None = None,
                 past_s: Tensor | None = None, seq_idx: Tensor | None = None) -> None:
    """Shape, dtype and device checks shared by every backend; errors name the argument."""
    check_tensors("feedback_solve", dict(f=f, q=q, k=k, gamma=gamma, past_k=past_k, past_s=past_s))
    if f.ndim != 3:
        raise ValueError(f"f must be (B, T, D); got {tuple(f.shape)}")
    B, T, _ = f.shape
    if q.ndim != 3 or q.shape[:2] != (B, T) or k.shape != q.shape:
        raise ValueError(f"q and k must be (B, T, Dk) with (B, T) = {(B, T)}; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if tuple(gamma.shape) != (B, T):
        raise ValueError(f"gamma must be (B, T) = {(B, T)}; got {tuple(gamma.shape)}")
    if (past_k is None) != (past_s is None):
        raise ValueError("past_k and past_s must be given together")
    P = 0
    if past_k is not None:
        P = past_k.shape[1]
        if past_k.shape != (B, P, q.shape[2]) or past_s.shape != (B, P, f.shape[2]):
            raise ValueError(f"past_k must be (B, P, Dk) and past_s (B, P, D); got {tuple(past_k.shape)}, {tuple(past_s.shape)}")
    check_segments("feedback_solve", seq_idx, (B, P + T), "(B, P + T)", f.device)


def validate(f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, *, past_k: Tensor | None = None,
             past_s: Tensor | None = None, seq_idx: Tensor | None = None, nonfinite_past: Tensor | None = None,
             **backend_options) -> None:
    """Every call's checks (run by the op before dispatch): check_inputs and the NaN-policy hint,
    plus with value checks on (kernels.value_checks) |gamma| < 1 and contiguous segments."""
    check_inputs(f, q, k, gamma, past_k, past_s, seq_idx)
    P = 0 if past_k is None else past_k.shape[1]
    check_flags("feedback_solve", "nonfinite_past", nonfinite_past, (f.shape[0], P), "(B, P)", f.device)
    if value_checks.active():
        check_values("feedback_solve", "gamma", gamma.abs(), gamma.abs() >= 1, "satisfy |gamma| < 1",
                     "max |gamma| = {max:.6g}", "; the feedback solve is unstable otherwise")
        if seq_idx is not None:
            check_contiguous(seq_idx, "seq_idx")


def nan_guard(f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, *, past_k: Tensor | None = None,
              past_s: Tensor | None = None, seq_idx: Tensor | None = None, nonfinite_past: Tensor | None = None,
              **options) -> nan_policy.Guarded:
    """The NaN policy (run by the op around every backend): every input is memory, over the cached
    and the new rows together -> cleaned inputs and the function that marks the output."""
    new_bad = nan_policy.flags(f, q, k, gamma)
    past_bad = nonfinite_past  # a cache that stores finite values and knows its flags
    if past_bad is None and past_k is not None:
        past_bad = nan_policy.flags(past_k, past_s)
        past_k, past_s = nan_policy.clean(past_k, past_bad), nan_policy.clean(past_s, past_bad)
    bad = new_bad if past_bad is None else torch.cat([past_bad, new_bad], dim=1)
    reached = nan_policy.reach_forward(bad, seq_idx)[:, bad.shape[1] - f.shape[1]:]
    inputs = tuple(nan_policy.clean(t, new_bad) for t in (f, q, k, gamma))
    kwargs = dict(past_k=past_k, past_s=past_s, seq_idx=seq_idx, **options)
    return inputs, kwargs, lambda s: nan_policy.mark(s, reached)


feedback_solve = Op("feedback_solve", __doc__, check=validate, nan_guard=nan_guard, nan_hints=("nonfinite_past",))


def strict_past(T: int, P: int, device: torch.device, seq_idx: Tensor | None = None) -> Tensor:
    """Bool mask (B or 1, T, P + T): key j is in the strict past of new row t (same segment)."""
    mask = (torch.arange(P + T, device=device)[None, :] < torch.arange(P, P + T, device=device)[:, None])[None]
    if seq_idx is not None:
        mask = mask & same_segment(seq_idx[:, P:], seq_idx)
    return mask


def routing_weights(q: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
    """alpha = masked softmax of q keys^T / sqrt(Dk); rows with no visible key are exactly 0."""
    logits = torch.einsum("btd,bsd->bts", q, keys) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~mask, float("-inf"))
    m = logits.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).min)  # -inf rows -> finite
    e = torch.exp(logits - m)
    return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
