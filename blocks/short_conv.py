"""Short causal depthwise convolution + SiLU over time, the q / k / v convs of Gated DeltaNet, DeltaNet
(and, optionally, GLA and RetNet), with FLA's parameter layout (`weight` (C, 1, K), optional `bias`).

    y_t = SiLU(bias + sum_{i < K} weight[:, i] * x_{t - K + 1 + i})

Packed sequences / left padding (seq_idx): an input reaches only outputs of its own run of equal
segment ids, so documents never see each other's tokens. Decoding continues from a window of the
K - 1 previous inputs and their segment ids (kept by the mixer's decoding state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class ShortConvolution(nn.Conv1d):
    """x (B, T, channels) -> SiLU(causal depthwise conv(x)) (B, T, channels)."""

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False):
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int; got kernel_size={kernel_size!r}")
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(self, x: Tensor, seq_idx: Tensor | None = None, window: Tensor | None = None,
                window_seq: Tensor | None = None) -> Tensor:
        """x (B, T, C); seq_idx (B, T) segment ids; window (B, K - 1, C) earlier inputs, oldest first,
        with their segment ids window_seq (B, K - 1) (decoding; None: nothing before, i.e. zeros)."""
        T, K = x.shape[1], self.kernel_size[0]
        if seq_idx is None and window is None:  # one segment per row, nothing before: the plain conv
            # as conv2d over the left-padded input viewed as (B, C, 1, K - 1 + T) in channels-last
            # memory, which is x's own (B, T, C) layout: no transposed copies in or out, and oneDNN's
            # channels-last kernels on CPU (faster than conv1d over a transposed (B, C, T) view)
            x4 = rearrange(F.pad(x, (0, 0, K - 1, 0)), "b t c -> b c 1 t")
            y = F.conv2d(x4, self.weight[:, :, None], self.bias, groups=self.groups)
            return F.silu(rearrange(y, "b c 1 t -> b t c"))
        if window is None:
            window = x.new_zeros(x.shape[0], K - 1, x.shape[2])
            window_seq = seq_idx[:, :1].expand(-1, K - 1)
        full = torch.cat([window.to(x.dtype), x], dim=1)  # (B, K - 1 + T, C)
        ids = torch.cat([window_seq, seq_idx], dim=1)
        run = F.pad((ids[:, 1:] != ids[:, :-1]).cumsum(dim=1), (1, 0))  # equal <=> same run of one segment
        weight = self.weight[:, 0]  # (C, K); tap i reads input t - (K - 1) + i
        y = torch.zeros_like(x) if self.bias is None else self.bias.expand_as(x)
        for i in range(K):
            same = (run[:, i:i + T] == run[:, K - 1:])[..., None]
            y = y + torch.where(same, full[:, i:i + T] * weight[:, i], 0.0)
        return F.silu(y)
