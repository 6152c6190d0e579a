"""Op `ssd`: Mamba-2's selective state-space scan (A = scalar x identity per head).

Contract
    ssd(x, dt, A, B, C, *, initial_state=None, seq_idx=None, chunk_size=64, return_final_state=False)
    x: (Bt, T, H, P)  dt: (Bt, T, H) step sizes (already softplus'd, > 0)  A: (H,) (negative)
    B, C: (Bt, T, G, N) with H % G == 0 (head h reads group h // (H // G))
    initial_state: (Bt, H, P, N) state before step 0; seq_idx: (Bt, T) segment ids (kernels.packing)
    returns y (Bt, T, H, P) in x's dtype, and the final state (Bt, H, P, N) if return_final_state.

Recurrence per head (state h: P x N):
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,     y_t = h_t C_t
where h_{t-1} is taken as 0 when step t starts a new segment (seq_idx changes); the initial state
belongs to the segment of step 0. The skip term D x and the gate are the mixer's business.
The `reference` backend is the sequential scan; `chunk_size` is a hint for chunked backends.

NaN policy (kernels.nan_policy, whatever the backend): C is read out, a non-finite element of C
at step t makes y_t NaN; x, dt and B are memory, one at step t makes NaN y from t to the end of
its segment (and the final state if that segment is the row's last); a non-finite initial state
of row b makes row b's first segment NaN; a non-finite A makes every output NaN. No other output
changes; NaN outputs pass no gradient back, and non-finite positions get gradient 0.

Checked on every call (before a backend is chosen; errors name the argument): shapes, floating
point tensors on one device, integer seq_idx on that device. With value checks on
(kernels.value_checks): A <= 0 and dt >= 0 (otherwise exp(dt A) > 1 and the state grows without
bound), contiguous segments.
"""

from __future__ import annotations

from torch import Tensor

from kernels import nan_policy, value_checks
from kernels.checks import check_segments, check_tensors, check_values
from kernels.dispatch import Op
from kernels.packing import check_contiguous, segment_starts  # noqa: F401  (segment_starts: re-exported)


def check_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> None:
    """Shape, dtype and device checks shared by every backend; errors name the argument."""
    check_tensors("ssd", dict(x=x, dt=dt, A=A, B=B, C=C, initial_state=initial_state))
    if x.ndim != 4:
        raise ValueError(f"x must be (batch, T, heads, head_dim); got {tuple(x.shape)}")
    Bt, T, H, P = x.shape
    if tuple(dt.shape) != (Bt, T, H):
        raise ValueError(f"dt must be (batch, T, heads) = {(Bt, T, H)}; got {tuple(dt.shape)}")
    if tuple(A.shape) != (H,):
        raise ValueError(f"A must be (heads,) = {(H,)}; got {tuple(A.shape)}")
    if B.ndim != 4 or B.shape[:2] != (Bt, T) or C.shape != B.shape or H % B.shape[2]:
        raise ValueError(f"B and C must be (batch, T, groups, state) with heads % groups == 0; got B {tuple(B.shape)}, C {tuple(C.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (Bt, H, P, B.shape[3]):
        raise ValueError(f"initial_state must be {(Bt, H, P, B.shape[3])}; got {tuple(initial_state.shape)}")
    check_segments("ssd", seq_idx, (Bt, T), "(batch, T)", x.device)


def validate(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
             seq_idx: Tensor | None = None, **backend_options) -> None:
    """Every call's checks (run by the op before dispatch): check_inputs, plus with value checks
    on (kernels.value_checks) A <= 0, dt >= 0 and contiguous segments."""
    check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    if value_checks.active():
        check_values("ssd", "A", A, A > 0, "be <= 0 (a decay)", "max A = {max:.6g}",
                     ", so exp(dt A) > 1 and the state grows without bound")
        check_values("ssd", "dt", dt, dt < 0, "be >= 0 (step sizes, already softplus'd)", "min dt = {min:.6g}")
        if seq_idx is not None:
            check_contiguous(seq_idx, "seq_idx")


def nan_guard(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
              seq_idx: Tensor | None = None, **options) -> nan_policy.Guarded:
    """The NaN policy (run by the op around every backend): C is read out; x, dt, B are memory to the
    end of their segment; A reaches everything, the initial state its row's first segment ->
    cleaned inputs and the function that marks y (and the final state)."""
    memory = nan_policy.flags(x, dt, B)
    C_bad, A_bad = nan_policy.flags(C), nan_policy.flags(A, batch_dims=0)
    init_bad = nan_policy.flags(initial_state, batch_dims=1)
    held = nan_policy.reach_forward(memory, seq_idx, first_run=init_bad) | A_bad  # (Bt, T): the state is NaN
    reached = held | C_bad
    inputs = (*(nan_policy.clean(t, memory) for t in (x, dt)), nan_policy.clean(A, A_bad),
              nan_policy.clean(B, memory), nan_policy.clean(C, C_bad))
    kwargs = dict(initial_state=nan_policy.clean(initial_state, init_bad), seq_idx=seq_idx, **options)
    return inputs, kwargs, lambda out: nan_policy.mark_outputs(out, reached, held[:, -1])


ssd = Op("ssd", __doc__, check=validate, nan_guard=nan_guard)
