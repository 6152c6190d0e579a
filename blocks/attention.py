"""Causal multi-head / grouped-query attention mixer with RoPE and an optional sliding window.

    q = RoPE(x Wq), k = RoPE(x Wk), v = x Wv        (no biases, as in LLaMA)
    o = attention(q, k, v, window, seq_idx)          (the `attention` op: causal, GQA, segments)
    y = o Wo

Positions for RoPE restart at 0 in every segment (kernels.packing.segment_positions) and continue
from the cache when decoding. The decoding state holds k (after RoPE) and v: a buffer of max_len
steps, or, with a sliding window, a ring buffer of the last window - 1 steps (all a new query can
see besides itself), so its size does not grow with the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from blocks.mixer import DecodeState, Mixer, check_backends, head_dims
from blocks.rope import RotaryEmbedding
from kernels.attention import attention
from kernels.packing import segment_positions


@dataclass
class AttentionState(DecodeState):
    """Keys (after RoPE) and values of the steps seen so far.

    k, v: (B, C, Hkv, d). Without a window C = max_len and step t sits at slot t; with a window
    C = min(window - 1, max_len) and step t sits at slot t % C (a ring of the most recent steps).
    """

    k: Tensor | None = None
    v: Tensor | None = None
    window: int | None = None
    segmented: bool = False  # some tokens came with explicit segment ids (else all are segment 0)

    def past(self, n: int) -> tuple[Tensor, Tensor]:
        """Ring buffer only: the last n <= C stored steps in time order: k, v (B, n, Hkv, d)."""
        slots = torch.arange(self.length - n, self.length, device=self.k.device) % self.k.shape[1]
        return self.k.index_select(1, slots), self.v.index_select(1, slots)

    def store(self, k: Tensor, v: Tensor) -> None:
        """Write the new steps k, v (B, T, Hkv, d), at [length, length + T), before `commit`."""
        T = k.shape[1]
        if self.window is None:
            self.k[:, self.length:self.length + T] = k
            self.v[:, self.length:self.length + T] = v
            return
        C = self.k.shape[1]
        keep = min(T, C)  # only the last C steps survive in the ring
        if keep == 0:
            return
        slots = torch.arange(self.length + T - keep, self.length + T, device=self.k.device) % C
        self.k.index_copy_(1, slots, k[:, T - keep:].to(self.k.dtype))
        self.v.index_copy_(1, slots, v[:, T - keep:].to(self.v.dtype))


class Attention(Mixer):
    """Causal attention mixer (B, T, D) -> (B, T, D).

    dim: width D;  num_heads: query heads H (head dim d = D / H);  num_kv_heads: key/value heads
    (grouped-query attention, divides H; default H);  rope / rope_base: rotary embedding on q and k;
    window: sliding window (a query sees itself and the window - 1 steps before it), None = full;
    backends: {"attention": backend name} pinned for this layer (see kernels.dispatch).
    """

    def __init__(self, dim: int, num_heads: int = 1, num_kv_heads: int | None = None, rope: bool = True,
                 rope_base: float = 10000.0, window: int | None = None, backends: dict[str, str] | None = None):
        super().__init__()
        num_kv_heads, head_dim = head_dims(dim, num_heads, num_kv_heads, rope)
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive int or None; got window={window!r}")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.window = window
        self.ops = check_backends("Attention", backends, uses=("attention",))
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.rope = RotaryEmbedding(head_dim, rope_base) if rope else None

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: AttentionState | None = None) -> Tensor:
        """x (B, T, D) -> (B, T, D). seq_idx (B, T) segment ids; with a state, of the new tokens only."""
        q = rearrange(self.q_proj(x), "b t (h d) -> b t h d", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b t (h d) -> b t h d", h=self.num_kv_heads)
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", h=self.num_kv_heads)
        if state is None:
            if self.rope is not None:
                positions = torch.arange(x.shape[1], device=x.device) if seq_idx is None else segment_positions(seq_idx)
                q, k = self.rope(q, positions), self.rope(k, positions)
            o = attention(q, k, v, window=self.window, seq_idx=seq_idx, backend=self.ops["attention"])
        else:
            o = self._step(q, k, v, seq_idx, state)
        return self.out_proj(rearrange(o, "b t h d -> b t (h d)"))

    def _step(self, q: Tensor, k: Tensor, v: Tensor, seq_idx: Tensor | None, state: AttentionState) -> Tensor:
        """Attend the new steps to the cached ones and themselves, then cache them: -> o (B, T, H, d)."""
        T = q.shape[1]
        state.segmented = state.segmented or seq_idx is not None
        seq_new, positions = state.begin(q, seq_idx)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        if state.window is None:  # the cache holds every step: attend to a view of it, no copy
            past = state.length
            state.store(k, v)
            keys, values = state.k[:, :past + T].to(k.dtype), state.v[:, :past + T].to(v.dtype)
        else:  # a ring of the last window - 1 steps: gather them in time order
            past = min(state.length, state.k.shape[1])
            past_k, past_v = state.past(past)
            keys = torch.cat([past_k.to(k.dtype), k], dim=1)
            values = torch.cat([past_v.to(v.dtype), v], dim=1)
            state.store(k, v)
        state.commit(seq_new, positions)
        kv_seq = state.past_seq_idx[:, state.length - past - T:] if state.segmented else None
        return attention(q, keys, values, window=self.window, seq_idx=kv_seq, backend=self.ops["attention"])

    def allocate_state(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> AttentionState:
        """An empty state for `batch_size` sequences of up to `max_len` tokens."""
        weight = self.k_proj.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        slots = max_len if self.window is None else min(self.window - 1, max_len)
        shape = (batch_size, slots, self.num_kv_heads, self.head_dim)
        return AttentionState(**AttentionState.track(batch_size, max_len, device),
                              k=torch.zeros(shape, device=device, dtype=dtype),
                              v=torch.zeros(shape, device=device, dtype=dtype), window=self.window)

    def state_numbers_per_token(self) -> int | None:
        """2 * Hkv * d (k and v) per token; None with a sliding window (the ring buffer has a fixed size)."""
        return 2 * self.num_kv_heads * self.head_dim if self.window is None else None
