"""The classic pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from blocks.mixer import DecodeState, Mixer
from blocks.mlp import MLP

NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


class ResidualBlock(nn.Module):
    """Pre-norm mixer + MLP block. `mixer` and `mlp` are factories called with the width;
    `mlp=None` gives a mixer-only block."""

    def __init__(self, dim: int, mixer: Callable[[int], Mixer], mlp: Callable[[int], nn.Module] | None = MLP,
                 norm: str = "layernorm", norm_eps: float = 1e-5):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm={norm!r}; valid: {', '.join(NORMS)}")
        for name, factory, example in (("mixer", mixer, "@Sessa"), ("mlp", mlp, "@MLP")):
            if isinstance(factory, str) or not (callable(factory) or (name == "mlp" and factory is None)):
                raise TypeError(f"ResidualBlock: {name} must be a factory {name}(dim) -> module (a class, or "
                                f"{example} in gin), not a name; got {name}={factory!r}")
        self.dim = dim
        self.norm1 = NORMS[norm](dim, eps=norm_eps)
        self.mixer = mixer(dim)
        self.norm2 = NORMS[norm](dim, eps=norm_eps) if mlp is not None else None
        self.mlp = mlp(dim) if mlp is not None else None

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: DecodeState | None = None) -> Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        x = x + self.mixer(self.norm1(x), seq_idx=seq_idx, state=state)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x

    def allocate_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> DecodeState:
        return self.mixer.allocate_state(batch_size, max_len, device=device, dtype=dtype)
