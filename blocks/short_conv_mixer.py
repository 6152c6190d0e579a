"""Short convolution as a mixer: a causal depthwise convolution over the last few steps, then SiLU.

    y_t = SiLU(sum_{i < K} w[:, i] * x_{t - K + 1 + i})        # per channel, K = kernel_size

On its own it only sees K - 1 steps back; its use is as the other half of a hybrid layer. In the
recall experiments of zoology (arXiv 2312.04927) and Based (arXiv 2402.18668) every attention-like
mixer is paired with such a short convolution (their BaseConv): it moves each token's identity
onto the next positions, so the next mixer can match a query against "the token before this one"
without first learning a previous-token attention head (Mamba-2 and Gated DeltaNet have this
convolution inside). In a `GatedBlock` the block's input projection and output gate make it
zoology's gated BaseConv. Layout symbol K: `LAYOUT = 'KA'` (a convolution layer, then attention).

Decoding state: the last K - 1 inputs and their segment ids (constant size); packed sequences and
left padding as segment ids, like the short convolutions of the recurrent mixers
(blocks.short_conv.ShortConvolution, FLA's parameter layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from blocks.mixer import DecodeState, Mixer, check_backends, check_positive_ints
from blocks.short_conv import ShortConvolution


@dataclass(kw_only=True)
class ShortConvState(DecodeState):
    """Decoding state of a ShortConv layer (constant size in the sequence length)."""

    conv: Tensor  # (B, kernel_size - 1, D) the last inputs, oldest first (zeros before the first token)
    conv_seq: Tensor  # (B, kernel_size - 1) int64 their segment ids


class ShortConv(Mixer):
    """Causal depthwise convolution + SiLU over `kernel_size` steps (see the module docstring).

    dim: channels.  kernel_size: taps K (the step itself and K - 1 before it; default 4, as the
    convolutions of Gated DeltaNet and Mamba-2).  bias: a bias per channel.  backends: none (no op).
    """

    def __init__(self, dim: int, kernel_size: int = 4, bias: bool = False, backends: dict[str, str] | None = None):
        super().__init__()
        check_positive_ints("ShortConv", dim=dim, kernel_size=kernel_size)
        self.ops = check_backends("ShortConv", backends, uses=())
        self.dim, self.kernel_size = dim, kernel_size
        self.conv1d = ShortConvolution(dim, kernel_size, bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"

    def allocate_state(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> ShortConvState:
        weight = self.conv1d.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        K = self.kernel_size
        return ShortConvState(**ShortConvState.track(batch_size, max_len, device),
                              conv=torch.zeros(batch_size, K - 1, self.dim, device=device, dtype=dtype),
                              conv_seq=torch.zeros(batch_size, K - 1, dtype=torch.long, device=device))

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: ShortConvState | None = None) -> Tensor:
        """x (B, T, dim) -> (B, T, dim). seq_idx (B, T) segment ids; with a state, of the new tokens only."""
        if state is None:
            if seq_idx is not None and tuple(seq_idx.shape) != tuple(x.shape[:2]):
                raise ValueError(f"seq_idx must be (B, T) = {tuple(x.shape[:2])}; got {tuple(seq_idx.shape)}")
            return self.conv1d(x, seq_idx)
        seq_idx, positions = state.begin(x, seq_idx)
        y = self.conv1d(x, seq_idx, state.conv, state.conv_seq)
        T = x.shape[1]
        state.conv = torch.cat([state.conv, x.to(state.conv.dtype)], dim=1)[:, T:]
        state.conv_seq = torch.cat([state.conv_seq, seq_idx], dim=1)[:, T:]
        state.commit(seq_idx, positions)
        return y
