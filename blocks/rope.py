"""Rotary position embedding on interleaved pairs (x[..., 0::2], x[..., 1::2]), as in Sessa's reference."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """RoPE with base `base` over a head dim `dim` (even). Angles are computed in float32."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE needs an even head dim; got head_dim={dim}")
        self.dim = dim
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (B, T, H, d); positions: (B, T) or (T,) integer -> rotated x, same shape and dtype."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (B, T, d/2) float32
        if angles.ndim == 2:
            angles = angles[None]
        work = torch.promote_types(x.dtype, torch.float32)
        cos, sin = angles.cos().to(work)[:, :, None], angles.sin().to(work)[:, :, None]
        x0, x1 = x[..., 0::2].to(work), x[..., 1::2].to(work)
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
        return out.flatten(-2).to(x.dtype)
