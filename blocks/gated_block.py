"""The paper's wrapper around any mixer (Sessa, Section "The block"):

    x~ = LayerNorm(x);  a, g = split(Linear_in(x~), 2);  s = Mixer(GELU(a));  y = x + Linear_out(s * g)
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from blocks.mixer import DecodeState, Mixer


class GatedBlock(nn.Module):
    """LayerNorm -> Linear(D, 2D) -> [GELU(a) -> mixer] * g -> Linear(D, D) -> + residual.

    `mixer` is a factory called with the width (a mixer class, or a gin-configured one).
    Parameter names match the reference checkpoints: ln, W_in, mixer, W_out.
    """

    def __init__(self, dim: int, mixer: Callable[[int], Mixer], ln_eps: float = 1e-5):
        super().__init__()
        if isinstance(mixer, str) or not callable(mixer):
            raise TypeError(f"GatedBlock: mixer must be a factory mixer(dim) -> Mixer (a class such as Sessa, or "
                            f"@Sessa in gin), not a name; got mixer={mixer!r}")
        self.dim = dim
        self.ln = nn.LayerNorm(dim, eps=ln_eps)
        self.W_in = nn.Linear(dim, 2 * dim)
        self.mixer = mixer(dim)
        self.W_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: DecodeState | None = None) -> Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        a, g = self.W_in(self.ln(x)).chunk(2, dim=-1)
        s = self.mixer(F.gelu(a), seq_idx=seq_idx, state=state)
        return x + self.W_out(s * g)

    def allocate_state(self, batch_size: int, max_len: int, device=None, dtype=None) -> DecodeState:
        return self.mixer.allocate_state(batch_size, max_len, device=device, dtype=dtype)
