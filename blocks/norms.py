"""Norms. The RMS norms here compute in float32 (or float64) whatever the input dtype.

    RMSNorm(dim)(x)                          x / rms(x) * weight
    GatedRMSNorm(dim, group_size)(x, z)      Mamba-2's gated norm: RMSNorm(x * silu(z)) per group
    GatedRMSNorm(..., norm_before_gate=True) RMSNorm(x) * silu(z) per group
    make_norm("rmsnorm", dim, eps)           the residual stream's norms by name (NORMS)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# The norms a residual stream can use, by name: torch's own modules (parameters `weight` and, for
# LayerNorm, `bias`). nn.RMSNorm equals mamba_ssm's and Hugging Face's RMSNorm bit for bit in float32.
NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """The norm called `kind` (a key of NORMS) over `dim` channels; an unknown name lists the valid ones."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm={kind!r}; valid: {', '.join(NORMS)}")
    return NORMS[kind](dim, eps=eps)


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
    """Mamba-2's output norm: y = RMSNorm(x * silu(z)), normalised over groups of `group_size`
    channels (None = all `dim` channels; Mamba-2 uses dim // num_groups). With
    `norm_before_gate=True` the gate comes after the norm: y = RMSNorm(x) * silu(z) (mamba_ssm's
    option of that name, and FLA's FusedRMSNormGated used by GLA, RetNet and Gated DeltaNet; the
    weight multiplies before the gate).

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
        gated = x.to(work) if self.norm_before_gate else x.to(work) * gate
        groups = rearrange(gated, "... (g d) -> ... g d", d=self.group_size)
        normed = rearrange(_rms_normalize(groups, self.eps), "... g d -> ... (g d)") * self.weight.to(work)
        return (normed * gate if self.norm_before_gate else normed).to(x.dtype)

    def extra_repr(self) -> str:
        before = ", norm_before_gate=True" if self.norm_before_gate else ""
        return f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}{before}"
