"""`mamba_ssm` backend of `ssd`: the chunked scan of Mamba-2's authors (`pip install mamba-ssm`, CUDA).

Written against mamba-ssm 2.0 - 2.3 (`mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`,
whose keywords initial_states, seq_idx and return_final_states exist since 2.0). How the op's
contract maps onto it (its docstring and kernels):
  * x, dt, A, B, C, initial_state: the same shapes and meaning; dt arrives already softplus'd, so
    no dt_bias / dt_softplus, and no D or z (the skip and the gate are the mixer's);
  * seq_idx: mamba_ssm resets the state where the id changes and lets the initial state belong to
    segment id 0 (the id "before" step 0 is 0), the op to the segment of step 0: the ids are
    shifted per row so that step 0 has id 0 (equalities, hence segments, are unchanged);
  * chunk_size: the hint as a power of two in [64, 256] (mamba_ssm's kernels are tuned for 256);
  * y in x's dtype, the final state (mamba_ssm: C's dtype) cast to x's dtype.
Declines (with reasons): CPU tensors, float64, B and C of different dtypes, P > 128, N > 256.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import module_probe
from kernels.ssd.contract import check_inputs, ssd

MAX_HEAD_DIM = 128  # P
MAX_STATE_DIM = 256  # N
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_probe = module_probe("mamba_ssm", cuda=True, requirement="mamba-ssm>=2.0,<3")


def _supports(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
              seq_idx: Tensor | None = None, chunk_size: int = 64, return_final_state: bool = False) -> str | None:
    floats = [t for t in (x, dt, A, B, C, initial_state) if t is not None]
    if any(t.device.type != "cuda" for t in floats):
        return f"needs CUDA tensors; got {sorted({t.device.type for t in floats})}"
    if any(t.dtype not in DTYPES for t in floats):
        return f"{sorted({str(t.dtype) for t in floats if t.dtype not in DTYPES})} not supported (float32, bfloat16, float16)"
    if B.dtype != C.dtype:
        return f"B and C must share a dtype; got {B.dtype}, {C.dtype}"
    if x.shape[-1] > MAX_HEAD_DIM:
        return f"head dim P > {MAX_HEAD_DIM} not supported (got {x.shape[-1]})"
    if B.shape[-1] > MAX_STATE_DIM:
        return f"state dim N > {MAX_STATE_DIM} not supported (got {B.shape[-1]})"
    return None


def chunk_len(chunk_size: int) -> int:
    """The chunk mamba_ssm runs for the op's hint: a power of two in [64, 256]."""
    return min(256, max(64, 1 << (max(1, chunk_size) - 1).bit_length()))


@ssd.register("mamba_ssm", priority=40, probe=_probe, supports=_supports)
def ssd_mamba_ssm(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, initial_state: Tensor | None = None,
                  seq_idx: Tensor | None = None, chunk_size: int = 64, return_final_state: bool = False):
    """Shapes as in the op contract (kernels.ssd); the mapping is in this module's docstring."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    if seq_idx is not None:
        seq_idx = (seq_idx - seq_idx[:, :1]).to(torch.int32).contiguous()
    out = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_len(chunk_size), initial_states=initial_state,
                                    seq_idx=seq_idx, return_final_states=return_final_state)
    if return_final_state:
        y, final = out
        return y, final.to(x.dtype)
    return out
