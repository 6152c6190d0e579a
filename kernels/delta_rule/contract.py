"""Op `delta_rule`: the (gated) delta rule with a matrix state per head (DeltaNet, Gated DeltaNet).

Contract
    delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None, seq_idx=None, chunk_size=64,
               return_final_state=False)
    q, k: (B, T, H, dk)   v: (B, T, H, dv)   (q, k and v share one floating dtype)
    beta: (B, T, H) write strength in (0, 1)   g: (B, T, H) log decay <= 0 per head, or None (no decay)
    scale: multiplies the output, default dk ** -0.5
    initial_state: (B, H, dk, dv) the state before step 0; seq_idx: (B, T) segment ids (kernels.packing)
    chunk_size: a hint for chunked backends (a positive int)
    returns o (B, T, H, dv) in q's dtype, and the final state (B, H, dk, dv) in q's dtype if return_final_state.

Recurrence per head (state S: dk x dv):
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = scale * S_t^T q_t
i.e. the state's prediction for k_t is moved towards v_t by a fraction beta_t (after the decay):
S_t = S' + beta_t k_t (v_t - S'^T k_t)^T with S' = exp(g_t) S_{t-1}. S_{t-1} is taken as 0 when step t
starts a new segment (seq_idx changes); the initial state belongs to the segment of step 0.
DeltaNet (arXiv 2406.06484) is g = None, Gated DeltaNet (arXiv 2412.06464) a data-dependent g.

The op computes the recurrence for any keys. It is a contraction only when beta_t |k_t|^2 <= 2
(I - beta k k^T then has eigenvalues in [-1, 1]); the mixers L2-normalise the keys, so |k_t| = 1
and beta in (0, 1) keep the state bounded; |k| is not checked. Half-precision inputs are computed
in float32. The `reference` backend is the recurrence above, token by token (also the T = 1
decoding path).

NaN policy (kernels.nan_policy, whatever the backend): q is read out, a non-finite element of q at
step t makes o_t NaN; k, v, beta and g are memory, one at step t makes NaN o from t to the end of
its segment (and the final state if that segment is the row's last); a non-finite initial state
of row b makes row b's first segment NaN. No other output changes; NaN outputs pass no gradient
back, and non-finite positions get gradient 0.

Checked on every call (before a backend is chosen; errors name the argument): shapes, floating
point tensors on one device, integer seq_idx on that device, chunk_size, scale. With value checks
on (kernels.value_checks): beta in [0, 1], g <= 0, contiguous segments.
"""

from __future__ import annotations

from torch import Tensor

from kernels import nan_policy, value_checks
from kernels.checks import check_values
from kernels.dispatch import Op
from kernels.linear_attention.contract import check_decays, check_state_inputs, scan_nan_guard


def check_inputs(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
                 scale: float | None = None, initial_state: Tensor | None = None, seq_idx: Tensor | None = None,
                 chunk_size: int = 64, return_final_state: bool = False) -> None:
    """Shape, dtype and device checks shared by every backend; errors name the argument."""
    check_state_inputs("delta_rule", q, k, v, dict(beta=beta, g=g), scale, initial_state, seq_idx, chunk_size,
                       return_final_state)
    B, T, H, _ = q.shape
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must be (batch, T, heads) = {(B, T, H)}; got {tuple(beta.shape)}")
    if g is not None and tuple(g.shape) != (B, T, H):
        raise ValueError(f"g must be (batch, T, heads) = {(B, T, H)} (a log decay per head) or None; "
                         f"got {tuple(g.shape)}")


def validate(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
             seq_idx: Tensor | None = None, **options) -> None:
    """Every call's checks (run by the op before dispatch): check_inputs, plus with value checks on
    (kernels.value_checks) beta in [0, 1], g <= 0 and contiguous segments."""
    check_inputs(q, k, v, beta, g, seq_idx=seq_idx, **options)
    if value_checks.active():
        check_values("delta_rule", "beta", beta, (beta < 0) | (beta > 1), "lie in [0, 1] (a write strength)",
                     "values in [{min:.6g}, {max:.6g}]")
        check_decays("delta_rule", g, seq_idx)


def nan_guard(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
              initial_state: Tensor | None = None, seq_idx: Tensor | None = None, **options) -> nan_policy.Guarded:
    """The NaN policy (run by the op around every backend): q is read out; k, v, beta, g are memory."""
    return scan_nan_guard(q, (k, v, beta, g), initial_state, seq_idx, options)


delta_rule = Op("delta_rule", __doc__, check=validate, nan_guard=nan_guard)
