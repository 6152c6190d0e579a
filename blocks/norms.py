"""RMS norms, computed in float32 (or float64) whatever the input dtype.

    RMSNorm(dim)(x)                          x / rms(x) * weight
    GatedRMSNorm(dim, group_size)(x, z)      Mamba-2's gated norm: RMSNorm(x * silu(z)) per group
    GatedRMSNorm(dim, norm_before_gate=True)(x, z)    RMSNorm(x) * silu(z) (GLA, RetNet, Gated DeltaNet)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def _rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2 over the last dim) + eps)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """x: (..., dim) -> x / sqrt(mean(x^2) + eps) * weight, same shape and dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        if dim < 1:
            raise ValueError(f"RMSNorm needs dim >= 1; got dim={dim}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        return (_rms_normalize(x.to(work), self.eps) * self.weight.to(work)).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """A gated output norm, normalised over groups of `group_size` channels (None = all `dim` channels).

    norm_before_gate=False (Mamba-2, which uses group_size = dim // num_groups): RMSNorm(x * silu(z)) * weight;
    norm_before_gate=True (GLA, RetNet, Gated DeltaNet; FLA's FusedRMSNormGated): RMSNorm(x) * weight * silu(z).
    x, z: (..., dim) -> (..., dim) in x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False):
        super().__init__()
        group_size = dim if group_size is None else group_size
        if group_size < 1 or dim % group_size:
            raise ValueError(f"group_size must divide dim={dim}; got group_size={group_size}")
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        gate = F.silu(z.to(work))
        inner = x.to(work) if self.norm_before_gate else x.to(work) * gate
        groups = rearrange(inner, "... (g d) -> ... g d", d=self.group_size)
        normed = rearrange(_rms_normalize(groups, self.eps), "... g d -> ... (g d)") * self.weight.to(work)
        return (normed * gate if self.norm_before_gate else normed).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
