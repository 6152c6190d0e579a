"""What the mixers with a (dk x dv) matrix state per head share (GatedDeltaNet, DeltaNet, GLA, RetNet):
their constant-size decoding state, the short q / k / v convolutions with their windows, segment
bookkeeping, and the call of the recurrence op (kernels.delta_rule, kernels.linear_attention).

A subclass builds its projections, sets `num_heads`, `head_k_dim`, `head_v_dim`, `chunk_size`,
`ops` (via `check_backends`) and calls `_init_convs`; its forward reads

    step = self._begin(x, seq_idx, state)                       # segment ids, positions, the state
    q, k, v = self._short_convs(step, self.q_proj(x), self.k_proj(x), self.v_proj(x))
    o = self._recur(step, delta_rule, q, k, v, beta, g)         # runs the op, advances the state
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from blocks.mixer import DecodeState, Mixer
from blocks.short_conv import ShortConvolution
from kernels.dispatch import Op
from kernels.packing import segment_positions


@dataclass(kw_only=True)
class RecurrentState(DecodeState):
    """Decoding state of one recurrent layer (constant size in the sequence length)."""

    conv: Tensor  # (B, conv_size - 1, q + k + v channels) the short convs' last inputs, oldest first (0 without convs)
    conv_seq: Tensor  # (B, conv_size - 1) int64 their segment ids
    recurrent: Tensor  # (B, heads, dk, dv) the op's state after the last token


@dataclass
class _Step:
    """One forward call: the new tokens' segment ids and positions, and the state it advances."""

    seq_idx: Tensor | None  # (B, T); None: one segment per row and no state
    positions: Tensor  # (B, T) or (T,) position of each token inside its segment (for RoPE)
    state: RecurrentState | None
    conv: Tensor | None = None  # the convs' next window, stored into the state by _recur


class RecurrentMixer(Mixer):
    """Base class of the matrix-state mixers (see the module docstring)."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int
    chunk_size: int

    def _init_convs(self, use_short_conv: bool, conv_size: int, conv_bias: bool, key_dim: int, value_dim: int) -> None:
        """q_conv1d, k_conv1d, v_conv1d (FLA's names) when `use_short_conv`, else none."""
        self.use_short_conv, self.conv_size = use_short_conv, conv_size if use_short_conv else 1
        self.conv_channels = (key_dim, key_dim, value_dim) if use_short_conv else (0, 0, 0)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, conv_size, conv_bias)
            self.k_conv1d = ShortConvolution(key_dim, conv_size, conv_bias)
            self.v_conv1d = ShortConvolution(value_dim, conv_size, conv_bias)

    def allocate_state(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> RecurrentState:
        weight = next(self.parameters())
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        return RecurrentState(
            **RecurrentState.track(batch_size, max_len, device),
            conv=torch.zeros(batch_size, self.conv_size - 1, sum(self.conv_channels), device=device, dtype=dtype),
            conv_seq=torch.zeros(batch_size, self.conv_size - 1, dtype=torch.long, device=device),
            recurrent=torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                                  dtype=dtype))

    def _begin(self, x: Tensor, seq_idx: Tensor | None, state: RecurrentState | None) -> _Step:
        B, T = x.shape[:2]
        if state is not None:
            seq_idx, positions = state.begin(x, seq_idx)
        elif seq_idx is not None:
            if tuple(seq_idx.shape) != (B, T):
                raise ValueError(f"seq_idx must be (B, T) = {(B, T)}; got {tuple(seq_idx.shape)}")
            positions = segment_positions(seq_idx)
        else:
            positions = torch.arange(T, device=x.device)
        return _Step(seq_idx, positions, state)

    def _short_convs(self, step: _Step, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """SiLU(conv) of each of q, k, v (B, T, channels), continuing from the state's windows."""
        if not self.use_short_conv:
            return q, k, v
        state = step.state
        windows = [None] * 3 if state is None else state.conv.to(q.dtype).split(self.conv_channels, dim=-1)
        window_seq = None if state is None else state.conv_seq
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        out = tuple(conv(u, step.seq_idx, w, window_seq) for conv, u, w in zip(convs, (q, k, v), windows))
        if state is not None:  # the last conv_size - 1 inputs, for the next call
            step.conv = torch.cat([state.conv.to(q.dtype), torch.cat([q, k, v], dim=-1)], dim=1)[:, q.shape[1]:]
        return out

    def _recur(self, step: _Step, op: Op, *args: Tensor) -> Tensor:
        """Run `op(*args)` with the layer's pinned backend from the state (if any), then advance the state."""
        state = step.state
        kwargs = dict(seq_idx=step.seq_idx, chunk_size=self.chunk_size, backend=self.ops[op.name])
        if state is None:
            return op(*args, **kwargs)
        B, T = step.seq_idx.shape
        # a row whose first new token starts a new segment starts from a zero state
        if state.length:
            cont = step.seq_idx[:, 0] == state.seq_idx[:, state.length - 1]
        else:
            cont = torch.ones(B, dtype=torch.bool, device=step.seq_idx.device)
        initial = torch.where(cont[:, None, None, None], state.recurrent, 0.0).to(args[0].dtype)
        o, final = op(*args, initial_state=initial, return_final_state=True, **kwargs)
        state.recurrent = final.to(state.recurrent.dtype)
        if step.conv is not None:
            state.conv = step.conv.to(state.conv.dtype)
            state.conv_seq = torch.cat([state.conv_seq, step.seq_idx], dim=1)[:, T:]
        state.commit(step.seq_idx, step.positions)
        return o

