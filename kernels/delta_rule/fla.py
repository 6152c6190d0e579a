"""`fla` backend of `delta_rule`: flash-linear-attention's chunked (gated) delta-rule kernels (CUDA).

Written against flash-linear-attention 0.6 (`pip install 'flash-linear-attention>=0.6,<0.7'`);
the mapping of the op's contract, read from the docstrings and code of
`fla.ops.delta_rule.chunk_delta_rule` and `fla.ops.gated_delta_rule.chunk_gated_delta_rule`:
  * g = None -> chunk_delta_rule (DeltaNet); a g per head -> chunk_gated_delta_rule (Gated DeltaNet;
    note its argument order q, k, v, g, beta: passed by keyword). chunk_delta_rule refuses float32,
    so float32 without g runs chunk_gated_delta_rule with g = 0 (exp(0) = 1: no decay, the same
    recurrence). FLA's g is a natural log decay like the op's, passed in float32; beta goes in q's
    dtype, as FLA's own layers pass it;
  * the recurrence is the op's: S' = exp(g_t) S_{t-1}, S_t = S' + beta_t k_t (v_t - S'^T k_t)^T,
    o_t = scale * S_t^T q_t; scale is always passed (FLA's default, dk ** -0.5, is the op's too);
  * keys: FLA normalises q and k only with use_qk_l2norm_in_kernel=True; the op computes the rule
    for the keys it is given (the mixers L2-normalise them), so this is always False. FLA's chunked
    form assumes what the op's docstring says keeps the state bounded (|k| = 1, beta in [0, 1]);
  * layout (B, T, H, d) on both sides (no grouped value heads: HV = H); states (B, H, dk, dv) go in
    as float32 and come back (float32) in q's dtype;
  * seq_idx: cu_seqlens over the flattened rows (kernels.fla_utils.Varlen: one host sync per call);
  * chunk_size: a hint for this project's chunked backend; FLA uses its default chunk (64 steps).
Declines (with reasons): CPU tensors, float64, dk > 256 (FLA's state kernels assert it), odd dk or
dv in float16 / bfloat16, GPUs below compute capability 7.0 (8.0 for bfloat16). Automatic selection
skips it inside torch.compile (FLA's entry points are graph breaks); pinned, it runs. FLA's kernels
multiply float32 operands in TF32 on GPUs that have it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import fla_utils
from kernels.delta_rule.contract import check_inputs, delta_rule

MAX_KEY_DIM = 256


def _probe() -> str | None:
    return fla_utils.probe("fla.ops.delta_rule") or fla_utils.probe("fla.ops.gated_delta_rule")


def _supports(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
              initial_state: Tensor | None = None, **options) -> str | None:
    why = fla_utils.supports(q, k, v, [beta, g, initial_state])
    if why is None and q.shape[-1] > MAX_KEY_DIM:
        why = f"dk > {MAX_KEY_DIM} not supported (FLA's delta-rule state kernels; got {q.shape[-1]})"
    return why


@delta_rule.register("fla", priority=40, probe=_probe, supports=_supports, auto=fla_utils.auto)
def delta_rule_fla(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
                   scale: float | None = None, initial_state: Tensor | None = None, seq_idx: Tensor | None = None,
                   chunk_size: int = 64, return_final_state: bool = False):
    """Shapes as in the op contract (kernels.delta_rule); the mapping is in this module's docstring."""
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    check_inputs(q, k, v, beta, g, scale=scale, initial_state=initial_state, seq_idx=seq_idx, chunk_size=chunk_size,
                 return_final_state=return_final_state)
    B, T, H, dk = q.shape
    state = torch.promote_types(q.dtype, torch.float32)  # float32 (float64 only for the CPU mapping tests)
    h0 = None if initial_state is None else initial_state.to(state)
    beta = beta.to(q.dtype)
    if g is None and q.dtype not in fla_utils.HALF:
        g = q.new_zeros(B, T, H, dtype=state)  # chunk_delta_rule is half precision only
    g = None if g is None else g.to(state)
    packed = None if seq_idx is None else fla_utils.Varlen.of(seq_idx)
    if packed is not None:
        q, k, v, beta = (packed.flatten(t) for t in (q, k, v, beta))
        g = None if g is None else packed.flatten(g)
        h0 = packed.initial_states(h0)
    varlen = {} if packed is None else dict(cu_seqlens=packed.cu_seqlens, cu_seqlens_cpu=packed.cu_seqlens_cpu)
    common = dict(q=q, k=k, v=v, beta=beta, scale=dk ** -0.5 if scale is None else scale, initial_state=h0,
                  output_final_state=return_final_state, use_qk_l2norm_in_kernel=False, **varlen)
    if g is None:
        o, ht = chunk_delta_rule(**common)
    else:
        o, ht = chunk_gated_delta_rule(g=g, **common)
    o = o.reshape(B, T, H, -1).to(q.dtype)
    if not return_final_state:
        return o
    return o, (ht if packed is None else packed.final_states(ht)).to(q.dtype)
