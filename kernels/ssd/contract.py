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

Checked on every call (before a backend is chosen; errors name the argument): shapes, floating
point tensors on one device, integer seq_idx. With value checks on (kernels.value_checks): A <= 0
and dt >= 0 (otherwise exp(dt A) > 1 and the state grows without bound), contiguous segments.
"""

from __future__ import annotations

from torch import Tensor

from kernels import value_checks
from kernels.dispatch import Op
from kernels.packing import check_contiguous, check_seq_idx, segment_starts  # noqa: F401  (segment_starts: re-exported)


def check_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> None:
    """Shape, dtype and device checks shared by every backend; errors name the argument."""
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("initial_state", initial_state)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"ssd: {name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"ssd: {name} must be a floating-point tensor; got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"ssd: {name} is on {t.device} but x is on {x.device}")
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
    if seq_idx is not None:
        check_seq_idx(seq_idx, (Bt, T), "(batch, T)", contiguous=False)


def validate(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
             seq_idx: Tensor | None = None, **backend_options) -> None:
    """Every call's checks (run by the op before dispatch): check_inputs, plus with value checks
    on (kernels.value_checks) A <= 0, dt >= 0 and contiguous segments."""
    check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    if value_checks.active():
        if A.numel() and not bool((A <= 0).all()):
            raise ValueError(f"ssd: A must be <= 0 (a decay); got max A = {A.max().item():.6g}, so exp(dt A) > 1 "
                             "and the state grows without bound")
        if dt.numel() and not bool((dt >= 0).all()):
            raise ValueError(f"ssd: dt must be >= 0 (step sizes, already softplus'd); got min dt = {dt.min().item():.6g}")
        if seq_idx is not None:
            check_contiguous(seq_idx, "seq_idx")


ssd = Op("ssd", __doc__, check=validate)
