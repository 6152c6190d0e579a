"""AdamW with weight-decay groups and the warmup + cosine learning-rate schedule.

Weight decay applies to matrices (Linear weights, embeddings: every parameter with 2+ dimensions);
biases, norm gains and other vectors/scalars (Sessa's gamma, Mamba-2's A_log, dt_bias, D) are not
decayed, as in nanoGPT.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters into a decayed group (ndim >= 2) and a non-decayed one."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
          eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`. Uses the fused kernel on CUDA."""
    if lr <= 0:
        raise ValueError(f"adamw: lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"adamw: weight_decay must be >= 0, got {weight_decay}")
    on_cuda = any(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             fused=True if on_cuda else None)


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate at `step` (0-based, the step about to be taken).

    Linear warmup from 1/warmup_steps to 1 over `warmup_steps` steps, then a cosine decay from 1
    down to `min_ratio` at `total_steps`; constant `min_ratio` after that. (A run shorter than
    its warmup simply stops while the rate is still rising.)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
             min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `warmup_cosine`; its state_dict (the step count) goes into checkpoints."""
    if total_steps < 1:
        raise ValueError(f"cosine_schedule: total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"cosine_schedule: warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"cosine_schedule: min_ratio must be in [0, 1], got {min_ratio}")

    def lr_lambda(step: int) -> float:
        return warmup_cosine(step, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
