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
"""

from __future__ import annotations

from torch import Tensor

from kernels.dispatch import Op
from kernels.packing import segment_starts  # noqa: F401  (re-exported: the masks every ssd backend shares)

ssd = Op("ssd", __doc__)


def check_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> None:
    """Shape checks shared by every backend; raises ValueError naming the argument."""
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
    if seq_idx is not None and tuple(seq_idx.shape) != (Bt, T):
        raise ValueError(f"seq_idx must be (batch, T) = {(Bt, T)}; got {tuple(seq_idx.shape)}")
