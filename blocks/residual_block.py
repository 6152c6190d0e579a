"""The classic pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)).

With `mlp=None` and `norm="rmsnorm"` it is the block of mamba_ssm's and Hugging Face's Mamba-2
language models (RMSNorm -> mixer -> add, no MLP); with an MLP, mamba_ssm's block with
`d_intermediate > 0`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from blocks.mixer import DecodeState, Mixer
from blocks.mlp import MLP
from blocks.norms import NORMS, make_norm

__all__ = ["NORMS", "ResidualBlock"]


class ResidualBlock(nn.Module):
    """Pre-norm mixer + MLP block. `mixer` and `mlp` are factories called with the width;
    `mlp=None` gives a mixer-only block. `norm`: a name in blocks.norms.NORMS.

    residual_in_fp32: keep the residual stream (this block's output) in at least float32 while the
    norms, mixer and MLP run in their own parameters' dtype, as mamba_ssm's and Hugging Face's
    Mamba-2 models do. The block then casts its input to the norm's dtype, so a bfloat16 model
    takes the float32 stream. Without it (the default) everything stays in the input's dtype; in
    float32 and float64 the two are identical.
    """

    def __init__(self, dim: int, mixer: Callable[[int], Mixer], mlp: Callable[[int], nn.Module] | None = MLP,
                 norm: str = "layernorm", norm_eps: float = 1e-5, residual_in_fp32: bool = False):
        super().__init__()
        for name, factory, example in (("mixer", mixer, "@Sessa"), ("mlp", mlp, "@MLP")):
            if isinstance(factory, str) or not (callable(factory) or (name == "mlp" and factory is None)):
                raise TypeError(f"ResidualBlock: {name} must be a factory {name}(dim) -> module (a class, or "
                                f"{example} in gin), not a name; got {name}={factory!r}")
        self.dim = dim
        self.norm1 = make_norm(norm, dim, norm_eps)
        self.mixer = mixer(dim)
        self.norm2 = make_norm(norm, dim, norm_eps) if mlp is not None else None
        self.mlp = mlp(dim) if mlp is not None else None
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: DecodeState | None = None) -> Tensor:
        """x: (B, T, D) -> (B, T, D) (at least float32 with residual_in_fp32)."""
        if not self.residual_in_fp32:
            x = x + self.mixer(self.norm1(x), seq_idx=seq_idx, state=state)
            if self.mlp is not None:
                x = x + self.mlp(self.norm2(x))
            return x
        dtype = self.norm1.weight.dtype
        residual = x.to(torch.promote_types(x.dtype, torch.float32))
        residual = residual + self.mixer(self.norm1(x.to(dtype)), seq_idx=seq_idx, state=state)
        if self.mlp is not None:
            residual = residual + self.mlp(self.norm2(residual.to(dtype)))
        return residual

    def allocate_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> DecodeState:
        return self.mixer.allocate_state(batch_size, max_len, device=device, dtype=dtype)
