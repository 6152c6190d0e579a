"""Feed-forward layers for the classic residual block."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """Linear(D, hD) -> GELU -> Linear(hD, D)."""

    def __init__(self, dim: int, hidden_mult: float = 4.0, bias: bool = True):
        super().__init__()
        hidden = int(dim * hidden_mult)
        self.fc_in = nn.Linear(dim, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class SwiGLU(nn.Module):
    """(SiLU(x W_gate) * x W_up) W_down, hidden width rounded up to a multiple of `multiple_of`."""

    def __init__(self, dim: int, hidden_mult: float = 8 / 3, multiple_of: int = 8, bias: bool = False):
        super().__init__()
        hidden = multiple_of * -(-int(dim * hidden_mult) // multiple_of)
        self.w_gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w_down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)
