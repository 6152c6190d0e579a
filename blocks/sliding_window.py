"""Sliding-window attention: the `Attention` mixer with a window, under its own name, so that layouts
can say 'SWSW' and gin can set `SlidingWindowAttention.window` apart from full attention's settings.

A query sees itself and the window - 1 steps before it; the decoding state is a ring buffer of the
last window - 1 keys and values: constant in the sequence length.
"""

from __future__ import annotations

from blocks.attention import Attention


class SlidingWindowAttention(Attention):
    """Causal attention over the last `window` steps (itself included); otherwise as `Attention`
    (num_heads, num_kv_heads, rope, rope_base, backends)."""

    def __init__(self, dim: int, num_heads: int = 1, num_kv_heads: int | None = None, rope: bool = True,
                 rope_base: float = 10000.0, window: int = 512, backends: dict[str, str] | None = None):
        if window is None:
            raise ValueError("SlidingWindowAttention needs a window (a positive int); for full attention use Attention")
        super().__init__(dim, num_heads, num_kv_heads, rope, rope_base, window, backends)
