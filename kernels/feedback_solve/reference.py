"""`reference` backend of `feedback_solve`: plain PyTorch, always available, the ground truth.

The forward runs in full float32 (float64 for float64 inputs) under autocast and whatever the
float32-matmul precision switches say (kernels.precision); its gradients are autograd's, in the
forward's float32, with the matmul precision in force when backward runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.feedback_solve.contract import check_inputs, feedback_solve, routing_weights, strict_past
from kernels.precision import exact_float32


@feedback_solve.register("reference", priority=0)
def feedback_solve_reference(f: Tensor, q: Tensor, k: Tensor, gamma: Tensor, *, past_k: Tensor | None = None,
                             past_s: Tensor | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """Dense: materialises alpha (B, T, P + T) and solves with a triangular solve."""
    check_inputs(f, q, k, gamma, past_k, past_s, seq_idx)
    with exact_float32(f.device):  # autocast and TF32 off: the solve amplifies rounding (kernels.precision)
        B, T, _ = f.shape
        P = 0 if past_k is None else past_k.shape[1]
        work = torch.promote_types(f.dtype, torch.float32)
        if T == 1 and P:
            return _one_new_row(f, q, gamma, past_k, past_s, seq_idx, work)
        keys = k if past_k is None else torch.cat([past_k, k], dim=1)
        alpha = routing_weights(q.to(work), keys.to(work), strict_past(T, P, f.device, seq_idx))
        g = gamma.to(work)[..., None]
        rhs = f.to(work)
        if P:
            rhs = rhs + g * (alpha[..., :P] @ past_s.to(work))
        eye = torch.eye(T, dtype=work, device=f.device)
        system = eye - g * alpha[..., P:]  # unit lower triangular (B, T, T)
        s = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        return s.to(f.dtype)


def _one_new_row(f: Tensor, q: Tensor, gamma: Tensor, past_k: Tensor, past_s: Tensor, seq_idx: Tensor | None,
                 work: torch.dtype) -> Tensor:
    """Decoding (T == 1 after P >= 1 cached rows): the new row's strict past is the cache alone, so
    s = f + gamma * softmax(q past_k^T / sqrt(Dk)) past_s, a weighted sum with nothing to solve."""
    q, past_k = q.to(work), past_k.to(work)
    if seq_idx is None:  # every cached row is visible: a plain softmax, no mask
        alpha = torch.softmax(q @ past_k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    else:
        P = past_k.shape[1]
        alpha = routing_weights(q, past_k, (seq_idx[:, :P] == seq_idx[:, P:])[:, None])
    s = torch.addcmul(f.to(work), gamma.to(work)[..., None], alpha @ past_s.to(work))
    return s.to(f.dtype)
