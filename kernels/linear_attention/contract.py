"""Op `linear_attention`: gated linear attention with a matrix state per head (GLA, RetNet, linear attention).

Contract
    linear_attention(q, k, v, g=None, *, scale=None, initial_state=None, seq_idx=None, chunk_size=64,
                     return_final_state=False)
    q, k: (B, T, H, dk)   v: (B, T, H, dv)   (q, k and v share one floating dtype)
    g: log decay <= 0, per key channel (B, T, H, dk), per head (B, T, H) (broadcast over dk), or None (no decay)
    scale: multiplies the output, default dk ** -0.5
    initial_state: (B, H, dk, dv) the state before step 0; seq_idx: (B, T) segment ids (kernels.packing)
    chunk_size: a hint for chunked backends (a positive int)
    returns o (B, T, H, dv) in q's dtype, and the final state (B, H, dk, dv) in q's dtype if return_final_state.

Recurrence per head (state S: dk x dv):
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = scale * S_t^T q_t
where S_{t-1} is taken as 0 when step t starts a new segment (seq_idx changes); the initial state
belongs to the segment of step 0. GLA (arXiv 2312.06635) is a data-dependent g per key channel,
RetNet (arXiv 2307.08621) a constant g per head, plain linear attention g = None. Half-precision
inputs are computed in float32. The `reference` backend is the recurrence above, token by token
(also the T = 1 decoding path).

NaN policy (kernels.nan_policy, whatever the backend): q is read out, a non-finite element of q at
step t makes o_t NaN; k, v and g are memory, one at step t makes NaN o from t to the end of its
segment (and the final state if that segment is the row's last); a non-finite initial state of
row b makes row b's first segment NaN. No other output changes; NaN outputs pass no gradient back,
and non-finite positions get gradient 0.

Checked on every call (before a backend is chosen; errors name the argument): shapes, floating
point tensors on one device, integer seq_idx on that device, chunk_size, scale. With value checks
on (kernels.value_checks): g <= 0 (otherwise exp(g) > 1 and the state grows without bound),
contiguous segments.
"""

from __future__ import annotations

from torch import Tensor

from kernels import nan_policy, value_checks
from kernels.checks import check_segments, check_tensors, check_values
from kernels.dispatch import Op
from kernels.packing import check_contiguous


def check_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, scale: float | None = None,
                 initial_state: Tensor | None = None, seq_idx: Tensor | None = None, chunk_size: int = 64,
                 return_final_state: bool = False) -> None:
    """Shape, dtype and device checks shared by every backend; errors name the argument."""
    check_state_inputs("linear_attention", q, k, v, dict(g=g), scale, initial_state, seq_idx, chunk_size,
                       return_final_state)
    B, T, H, dk = q.shape
    if g is not None and tuple(g.shape) not in ((B, T, H, dk), (B, T, H)):
        raise ValueError(f"g must be (batch, T, heads, dk) = {(B, T, H, dk)} (per key channel) or "
                         f"(batch, T, heads) = {(B, T, H)} (per head) or None; got {tuple(g.shape)}")


def check_state_inputs(op: str, q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor | None],
                       scale: float | None, initial_state: Tensor | None, seq_idx: Tensor | None, chunk_size: int,
                       return_final_state: bool) -> None:
    """The checks linear_attention and delta_rule share: q, k, v, the gate tensors in `gates` (their
    kind and device; the caller checks their shapes), scale, initial_state, seq_idx, chunk_size."""
    check_tensors(op, dict(q=q, k=k, v=v, **gates, initial_state=initial_state))
    if q.ndim != 4:
        raise ValueError(f"q must be (batch, T, heads, dk); got {tuple(q.shape)}")
    B, T, H, dk = q.shape
    if tuple(k.shape) != (B, T, H, dk):
        raise ValueError(f"k must be (batch, T, heads, dk) = {(B, T, H, dk)} like q; got {tuple(k.shape)}")
    if v.ndim != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be (batch, T, heads, dv) with (batch, T, heads) = {(B, T, H)}; got {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{op}: q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be a number or None; got {scale!r}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, dk, v.shape[3]):
        raise ValueError(f"initial_state must be (batch, heads, dk, dv) = {(B, H, dk, v.shape[3])}; "
                         f"got {tuple(initial_state.shape)}")
    check_segments(op, seq_idx, (B, T), "(batch, T)", q.device)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int; got chunk_size={chunk_size!r}")
    if not isinstance(return_final_state, bool):
        raise TypeError(f"{op}: return_final_state must be a bool; got {return_final_state!r}")


def check_decays(op: str, g: Tensor | None, seq_idx: Tensor | None) -> None:
    """The value checks linear_attention and delta_rule share (run with kernels.value_checks on)."""
    check_values(op, "g", g, None if g is None else g > 0, "be <= 0 (a log decay)", "max g = {max:.6g}",
                 ", so exp(g) > 1 and the state grows without bound")
    if seq_idx is not None:
        check_contiguous(seq_idx, "seq_idx")


def validate(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, seq_idx: Tensor | None = None,
             **options) -> None:
    """Every call's checks (run by the op before dispatch): check_inputs, plus with value checks on
    (kernels.value_checks) g <= 0 and contiguous segments."""
    check_inputs(q, k, v, g, seq_idx=seq_idx, **options)
    if value_checks.active():
        check_decays("linear_attention", g, seq_idx)


def scan_nan_guard(q: Tensor, memory: tuple[Tensor | None, ...], initial_state: Tensor | None,
                   seq_idx: Tensor | None, options: dict) -> nan_policy.Guarded:
    """The NaN policy of linear_attention and delta_rule: q is read out, `memory` (the other inputs
    with a time axis, in argument order) reaches the rest of its segment, the initial state its
    row's first segment -> (q, *memory) and the keywords cleaned, and the function that marks o
    (and the final state)."""
    q_bad, init_bad = nan_policy.flags(q), nan_policy.flags(initial_state, batch_dims=1)
    memory_bad = nan_policy.flags(*memory)
    held = nan_policy.reach_forward(memory_bad, seq_idx, first_run=init_bad)  # (B, T): the state is NaN
    inputs = (nan_policy.clean(q, q_bad), *(nan_policy.clean(t, memory_bad) for t in memory))
    kwargs = dict(initial_state=nan_policy.clean(initial_state, init_bad), seq_idx=seq_idx, **options)
    return inputs, kwargs, lambda out: nan_policy.mark_outputs(out, held | q_bad, held[:, -1])


def nan_guard(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, initial_state: Tensor | None = None,
              seq_idx: Tensor | None = None, **options) -> nan_policy.Guarded:
    """The NaN policy (run by the op around every backend): q is read out; k, v, g are memory."""
    return scan_nan_guard(q, (k, v, g), initial_state, seq_idx, options)


linear_attention = Op("linear_attention", __doc__, check=validate, nan_guard=nan_guard)
