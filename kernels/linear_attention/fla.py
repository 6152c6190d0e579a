"""`fla` backend of `linear_attention`: flash-linear-attention's chunked GLA kernels (CUDA).

Written against flash-linear-attention 0.6 (`pip install 'flash-linear-attention>=0.6,<0.7'`);
the mapping of the op's contract, read from the docstrings and code of `fla.ops.gla.chunk_gla` and
`fla.ops.simple_gla.chunk_simple_gla`:
  * g per key channel (B, T, H, dk) -> chunk_gla(q, k, v, g); g per head (B, T, H) ->
    chunk_simple_gla(g=g); g = None -> chunk_simple_gla(g=None), which is what FLA's own
    linear-attention kernel (`chunk_linear_attn` without normalisation) runs. FLA's g is a natural
    log decay like the op's (it rescales to base 2 inside) and is passed in float32;
  * the recurrence is the op's: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t
    (FLA multiplies q by scale); scale is always passed (FLA's default, dk ** -0.5, is the op's too);
  * layout (B, T, H, d) on both sides; states (B, H, dk, dv), FLA's default key-first layout;
    initial states go in as float32 (chunk_gla asserts it), final states (float32) come back in q's dtype;
  * seq_idx: cu_seqlens over the flattened rows (kernels.fla_utils.Varlen: one host sync per call);
  * chunk_size: a hint for this project's chunked backend; FLA uses its own tuned chunk (64 steps).
Declines (with reasons): CPU tensors, float64, odd dk or dv in float16 / bfloat16 (FLA's backward
asserts even head dims there), GPUs below compute capability 7.0 (8.0 for bfloat16). Automatic
selection skips it inside torch.compile (FLA's entry points are graph breaks); pinned, it runs.
FLA's kernels multiply float32 operands in TF32 on GPUs that have it: float32 results are close to
TF32 precision, not full float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import fla_utils
from kernels.linear_attention.contract import check_inputs, linear_attention


def _probe() -> str | None:
    return fla_utils.probe("fla.ops.gla") or fla_utils.probe("fla.ops.simple_gla")


def _supports(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, initial_state: Tensor | None = None,
              **options) -> str | None:
    return fla_utils.supports(q, k, v, [g, initial_state])


@linear_attention.register("fla", priority=40, probe=_probe, supports=_supports, auto=fla_utils.auto)
def linear_attention_fla(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, *, scale: float | None = None,
                         initial_state: Tensor | None = None, seq_idx: Tensor | None = None, chunk_size: int = 64,
                         return_final_state: bool = False):
    """Shapes as in the op contract (kernels.linear_attention); the mapping is in this module's docstring."""
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    check_inputs(q, k, v, g, scale=scale, initial_state=initial_state, seq_idx=seq_idx, chunk_size=chunk_size,
                 return_final_state=return_final_state)
    B, T, H, dk = q.shape
    state = torch.promote_types(q.dtype, torch.float32)  # float32 (float64 only for the CPU mapping tests)
    h0 = None if initial_state is None else initial_state.to(state)
    g = None if g is None else g.to(state)
    packed = None if seq_idx is None else fla_utils.Varlen.of(seq_idx)
    if packed is not None:
        q, k, v = (packed.flatten(t) for t in (q, k, v))
        g = None if g is None else packed.flatten(g)
        h0 = packed.initial_states(h0)
    varlen = {} if packed is None else dict(cu_seqlens=packed.cu_seqlens, cu_seqlens_cpu=packed.cu_seqlens_cpu)
    common = dict(scale=dk ** -0.5 if scale is None else scale, initial_state=h0,
                  output_final_state=return_final_state, **varlen)
    if g is not None and g.ndim == 4:  # a decay per key channel
        o, ht = chunk_gla(q, k, v, g, **common)
    else:  # a decay per head, or none
        o, ht = chunk_simple_gla(q, k, v, g=g, **common)
    o = o.reshape(B, T, H, -1).to(q.dtype)
    if not return_final_state:
        return o
    return o, (ht if packed is None else packed.final_states(ht)).to(q.dtype)
