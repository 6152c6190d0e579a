"""Rotary position embedding on interleaved pairs (x[..., 0::2], x[..., 1::2]), as in Sessa's reference."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def inverse_frequencies(dim: int, base: float) -> Tensor:
    """base^(-2i/dim) for i < dim/2, float32 on the CPU: (dim/2,)."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)


class RotaryEmbedding(nn.Module):
    """RoPE with base `base` (> 0) over a head dim `dim` (even). Angles are computed in float32
    (float64 for a float64 module).

    The frequencies are computed in float32 and never rounded below it: `.half()` or
    `.to(torch.bfloat16)` would otherwise round them (a relative error of 2^-8 in bfloat16, i.e.
    wrong angles after a few hundred positions), so every cast or move recomputes them, in float32
    or the module's wider dtype, on the new device."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"RoPE needs an even head dim >= 2; got head_dim={dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 < base < math.inf:
            raise ValueError(f"rope_base must be a finite number > 0 (base^(-2i/d) is not a real frequency "
                             f"otherwise); got rope_base={base!r}")
        self.dim, self.base = dim, float(base)
        self.register_buffer("inv_freq", inverse_frequencies(dim, self.base), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        dtype = torch.promote_types(self.inv_freq.dtype, torch.float32)
        self.inv_freq = inverse_frequencies(self.dim, self.base).to(self.inv_freq.device, dtype)
        return self

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

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base:g}"
