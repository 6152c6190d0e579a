"""Causal multi-head / grouped-query attention with RoPE and an optional sliding window.

    q = RoPE(x Wq), k = RoPE(x Wk), v = x Wv        (+ biases with qkv_bias=True; LLaMA has none)
    o = attention(q, k, v, window, seq_idx)          (the `attention` op: causal, GQA, segments)
    y = o Wo                                         (y = o, heads concatenated, with out_proj=False)

This is the `Attention` mixer and also Sessa's forward branch (`blocks.sessa.Sessa` subclasses it,
with qkv_bias=True and out_proj only when num_heads > 1, as in the reference code).

Positions for RoPE restart at 0 in every segment (kernels.packing.segment_positions) and continue
from the cache when decoding. The decoding state holds k (after RoPE) and v: a buffer of max_len
steps, or, with a sliding window, a ring buffer of the last window - 1 steps (all a new query can
see besides itself), so its size does not grow with the sequence. A NaN or inf key or value is
stored as zeros with a flag per step, which the op reads instead of the whole cache (its NaN
policy, kernels.nan_policy). While every row holds a single
segment no segment ids reach the op, so a decoding step builds no mask over the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from blocks.mixer import DecodeState, Mixer, check_backends, head_dims
from blocks.rope import RotaryEmbedding
from kernels import nan_policy
from kernels.attention import attention
from kernels.packing import segment_positions


@dataclass(kw_only=True)
class AttentionState(DecodeState):
    """Keys (after RoPE) and values of the steps seen so far.

    k, v: (B, C, Hkv, d). Without a window C = max_len and step t sits at slot t; with a window
    C = min(window - 1, max_len) and step t sits at slot t % C (a ring of the most recent steps).
    """

    k: Tensor
    v: Tensor
    nonfinite: Tensor  # (B, C) bool: slots whose k or v was NaN or inf (stored as zeros; kernels.nan_policy)
    window: int | None = None
    segmented: bool = False  # some row holds more than one segment: the op needs segment ids

    def begin(self, x: Tensor, seq_idx: Tensor | None) -> tuple[Tensor, Tensor]:
        """DecodeState.begin, and note when a row starts holding more than one segment."""
        seq_new, positions = super().begin(x, seq_idx)
        if seq_idx is not None and not self.segmented:
            first = seq_new[:, :1] if self.length == 0 else self.seq_idx[:, :1]  # each row's first segment id
            self.segmented = bool((seq_new != first).any())
        return seq_new, positions

    def past(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Ring buffer only: the last n <= C stored steps in time order: k, v (B, n, Hkv, d), nonfinite (B, n)."""
        slots = torch.arange(self.length - n, self.length, device=self.k.device) % self.k.shape[1]
        return self.k.index_select(1, slots), self.v.index_select(1, slots), self.nonfinite.index_select(1, slots)

    def store(self, k: Tensor, v: Tensor, nonfinite: Tensor | None) -> None:
        """Write the new steps k, v (B, T, Hkv, d) and their flags (B, T) (None: all finite), at
        [length, length + T), before `commit`."""
        T = k.shape[1]
        nonfinite = torch.zeros(k.shape[:2], dtype=torch.bool, device=k.device) if nonfinite is None else nonfinite
        if self.window is None:
            self.k[:, self.length:self.length + T] = k
            self.v[:, self.length:self.length + T] = v
            self.nonfinite[:, self.length:self.length + T] = nonfinite
            return
        C = self.k.shape[1]
        keep = min(T, C)  # only the last C steps survive in the ring
        if keep == 0:
            return
        slots = torch.arange(self.length + T - keep, self.length + T, device=self.k.device) % C
        self.k.index_copy_(1, slots, k[:, T - keep:].to(self.k.dtype))
        self.v.index_copy_(1, slots, v[:, T - keep:].to(self.v.dtype))
        self.nonfinite.index_copy_(1, slots, nonfinite[:, T - keep:])


class Attention(Mixer):
    """Causal attention mixer (B, T, D) -> (B, T, D).

    dim: width D;  num_heads: query heads H (head dim d = D / H);  num_kv_heads: key/value heads
    (grouped-query attention, divides H; default H);  rope / rope_base: rotary embedding on q and k;
    window: sliding window (a query sees itself and the window - 1 steps before it), None = full;
    backends: {"attention": backend name} pinned for this layer (see kernels.dispatch);
    qkv_bias: biases on the q, k, v projections;  out_proj: the output projection Wo (D -> D, no
    bias), else the heads' outputs are returned concatenated.
    """

    def __init__(self, dim: int, num_heads: int = 1, num_kv_heads: int | None = None, rope: bool = True,
                 rope_base: float = 10000.0, window: int | None = None, backends: dict[str, str] | None = None,
                 qkv_bias: bool = False, out_proj: bool = True):
        super().__init__()
        num_kv_heads, head_dim = head_dims(dim, num_heads, num_kv_heads, rope)
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive int or None; got window={window!r}")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.window = window
        self.ops = check_backends("Attention", backends, uses=("attention",))
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim, bias=False) if out_proj else nn.Identity()
        self.rope = RotaryEmbedding(head_dim, rope_base) if rope else None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"rope={self.rope is not None}, window={self.window}")

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state: AttentionState | None = None) -> Tensor:
        """x (B, T, D) -> (B, T, D). seq_idx (B, T) segment ids; with a state, of the new tokens only,
        and the state is advanced."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, {self.dim}); got {tuple(x.shape)}")
        o = self._attend(x, seq_idx) if state is None else self._step(x, seq_idx, state)
        return self.out_proj(rearrange(o, "b t h d -> b t (h d)"))

    def _qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D), positions (B, T) or (T,) -> q (B, T, H, d), k, v (B, T, Hkv, d), RoPE applied."""
        q = rearrange(self.q_proj(x), "b t (h d) -> b t h d", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b t (h d) -> b t h d", h=self.num_kv_heads)
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", h=self.num_kv_heads)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def _attend(self, x: Tensor, seq_idx: Tensor | None) -> Tensor:
        """The full forward: -> o (B, T, H, d)."""
        positions = torch.arange(x.shape[1], device=x.device) if seq_idx is None else segment_positions(seq_idx)
        q, k, v = self._qkv(x, positions)
        return attention(q, k, v, window=self.window, seq_idx=seq_idx, backend=self.ops["attention"])

    def _step(self, x: Tensor, seq_idx: Tensor | None, state: AttentionState) -> Tensor:
        """Prefill, chunked prefill or decoding: attend the new steps to the cached ones and themselves,
        then cache them -> o (B, T, H, d)."""
        T = x.shape[1]
        seq_new, positions = state.begin(x, seq_idx)
        q, k, v = self._qkv(x, positions)
        (k, v), bad = nan_policy.cache_entries(k, v)  # the cache holds finite values and their flags
        if state.window is None:  # the cache holds every step: attend to a view of it, no copy
            past = state.length
            state.store(k, v, bad)
            keys, values = state.k[:, :past + T].to(q.dtype), state.v[:, :past + T].to(q.dtype)  # no-ops unless a cast
            nonfinite = state.nonfinite[:, :past + T]
        else:  # a ring of the last window - 1 steps: gather them in time order
            past = min(state.length, state.k.shape[1])
            past_k, past_v, past_bad = state.past(past)
            keys = torch.cat([past_k.to(k.dtype), k], dim=1)
            values = torch.cat([past_v.to(v.dtype), v], dim=1)
            nonfinite = None if bad is None else torch.cat([past_bad, bad], dim=1)
            state.store(k, v, bad)
        state.commit(seq_new, positions)
        kv_seq = state.past_seq_idx[:, state.length - past - T:] if state.segmented else None
        return attention(q, keys, values, window=self.window, seq_idx=kv_seq, nonfinite_kv=nonfinite,
                         backend=self.ops["attention"])

    def allocate_state(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> AttentionState:
        """An empty state for `batch_size` sequences of up to `max_len` tokens (q_proj's device and dtype by default)."""
        return AttentionState(**self._state_fields(batch_size, max_len, device, dtype))

    def _state_fields(self, batch_size: int, max_len: int, device: torch.device | str | None,
                      dtype: torch.dtype | None) -> dict:
        """The fields of an empty AttentionState (a subclass's state adds its own)."""
        weight = self.q_proj.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        slots = max_len if self.window is None else min(self.window - 1, max_len)
        shape = (batch_size, slots, self.num_kv_heads, self.head_dim)
        return dict(**DecodeState.track(batch_size, max_len, device), k=torch.zeros(shape, device=device, dtype=dtype),
                    v=torch.zeros(shape, device=device, dtype=dtype),
                    nonfinite=torch.zeros(shape[:2], dtype=torch.bool, device=device), window=self.window)

    def state_numbers_per_token(self) -> int | None:
        """2 * Hkv * d (k and v) per token; None with a sliding window (the ring buffer has a fixed size)."""
        return 2 * self.num_kv_heads * self.head_dim if self.window is None else None
