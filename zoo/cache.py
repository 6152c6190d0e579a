"""One decoding cache for a whole stack, whatever its mix of mixers.

    cache = StackCache.allocate(model, batch_size=4, max_len=512)   # a CausalLM or a Stack
    logits = model(prompt, seq_idx=ids, cache=cache)   # prefill, in one pass or several chunks
    logits = model(next_token, cache=cache)            # a step (B, 1) or a chunk (B, T)
    cache.reorder(torch.tensor([0, 0, 2, 1]))          # beam search: reorder / select rows
    print(cache.describe())                            # memory per sequence, layer by layer

The cache is the list of the layers' own decoding states (`blocks.mixer.DecodeState` subclasses:
`SessaState`, `AttentionState`, `Mamba2State`, or a user mixer's), each allocated by its layer's
mixer. Every call advances all of them by the same tokens, so they hold the same `length`. The
model checks a call against the cache once, before any layer runs: the batch must match, and
the new tokens must fit into what is left of `max_len`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from blocks.mixer import DecodeState, Mixer


@dataclass(frozen=True)
class LayerCacheSize:
    """Memory of one layer's decoding state."""

    layer: int
    mixer: str  # registry name of the mixer ("sessa", ...), else its class name
    state: str  # class name of the state
    numbers_per_token: int | None  # numbers the state grows by per token; None: constant size
    nbytes_per_sequence: int  # bytes per sequence at the allocated max_len (bookkeeping included)


def layer_signature(layer: nn.Module) -> str:
    """What a layer's decoding state depends on: the mixer's class and sizes (its extra_repr)."""
    mixer = getattr(layer, "mixer", layer)
    return f"{type(mixer).__name__}({mixer.extra_repr()})"


class StackCache:
    """The decoding states of every layer of a stack, advanced together.

    Build it with `StackCache.allocate`; pass it to `CausalLM.forward(..., cache=)` or
    `Stack.forward(..., cache=)`. It remembers the stack it was allocated for (`signature`: each
    layer's mixer and sizes), and a stack refuses a cache allocated for another width or layer order.
    """

    def __init__(self, states: Sequence[DecodeState], mixers: Sequence[str], numbers_per_token: Sequence[int | None],
                 signature: Sequence[str] | None = None):
        if not states or not all(isinstance(s, DecodeState) for s in states):
            raise TypeError("states must be a non-empty list of DecodeState (one per layer)")
        if not len(states) == len(mixers) == len(numbers_per_token):
            raise ValueError(f"states ({len(states)}), mixers ({len(mixers)}) and numbers_per_token "
                             f"({len(numbers_per_token)}) must have one entry per layer")
        self.states = list(states)
        self.mixers = list(mixers)
        self.numbers_per_token = list(numbers_per_token)
        self.signature = tuple(signature) if signature is not None else None

    @classmethod
    def allocate(cls, model: nn.Module, batch_size: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> StackCache:
        """An empty cache for `batch_size` sequences of up to `max_len` tokens each (prompt included).

        model: a CausalLM (anything with a `.stack`) or a Stack. device / dtype: of the cached
        tensors; by default each layer's own parameters' device and dtype.
        """
        stack = model.stack if isinstance(getattr(model, "stack", None), nn.Module) else model
        if not hasattr(stack, "allocate_states") or not hasattr(stack, "layers"):
            raise TypeError(f"model must be a CausalLM-like model with a .stack, or a Stack; got {type(model).__name__}")
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {name}={value!r}")
        states = stack.allocate_states(batch_size, max_len, device=device, dtype=dtype)
        names = getattr(stack, "mixer_names", [None] * len(stack.layers))
        mixers, per_token = [], []
        for layer, name in zip(stack.layers, names):
            mixer = getattr(layer, "mixer", layer)
            mixers.append(name or type(mixer).__name__)
            per_token.append(mixer.state_numbers_per_token() if isinstance(mixer, Mixer) else None)
        return cls(states, mixers, per_token, [layer_signature(layer) for layer in stack.layers])

    # ------------------------------------------------------------------ sizes
    @property
    def length(self) -> int:
        """Tokens held so far (the same for every row and layer)."""
        return self.states[0].length

    @property
    def max_len(self) -> int:
        return self.states[0].max_len

    @property
    def batch_size(self) -> int:
        return self.states[0].batch_size

    @property
    def num_layers(self) -> int:
        return len(self.states)

    def check(self, batch_size: int, num_tokens: int) -> None:
        """Raise (naming the numbers) unless `num_tokens` new tokens of a batch of `batch_size` fit."""
        lengths = [s.length for s in self.states]
        if len(set(lengths)) > 1:
            raise RuntimeError(f"cache is inconsistent: its layers hold {lengths} tokens (a previous call failed "
                               "part way through); allocate a new cache")
        if batch_size != self.batch_size:
            raise ValueError(f"cache was allocated for batch_size={self.batch_size} but the input has batch size "
                             f"{batch_size} (allocate a cache for this batch, or reorder/select its rows)")
        left = self.max_len - self.length
        if num_tokens > left:
            raise ValueError(f"cache too short: {num_tokens} new tokens requested but only {left} left "
                             f"(max_len={self.max_len}, {self.length} already held); allocate a larger max_len")

    # ------------------------------------------------------------------ beam search
    def reorder(self, index: Tensor | Sequence[int]) -> None:
        """Reorder or select the batch rows of every layer in place: row i becomes old row index[i].

        index (B',) integers in [0, batch_size); B' may differ from batch_size (e.g. beam search
        keeping the best beams, or dropping finished rows)."""
        index = torch.as_tensor(index)
        if index.ndim != 1 or index.numel() == 0 or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"index must be a non-empty 1-D integer tensor of row numbers; got {index.dtype} "
                             f"{tuple(index.shape)}")
        if bool(((index < 0) | (index >= self.batch_size)).any()):
            raise ValueError(f"index must lie in [0, batch_size={self.batch_size}); got {index.tolist()}")
        for state in self.states:
            state.reorder(index.long())

    # ------------------------------------------------------------------ memory
    def layer_sizes(self) -> list[LayerCacheSize]:
        """Per-layer memory: numbers per token and bytes per sequence."""
        return [LayerCacheSize(i, mixer, type(state).__name__, per_token, state.nbytes_per_sequence())
                for i, (state, mixer, per_token) in enumerate(zip(self.states, self.mixers, self.numbers_per_token))]

    def nbytes_per_sequence(self) -> int:
        """Bytes the whole cache holds per sequence at its max_len (sum over `layer_sizes()`)."""
        return sum(size.nbytes_per_sequence for size in self.layer_sizes())

    def describe(self) -> str:
        """A table of the per-layer memory."""
        rows = [("layer", "mixer", "state", "numbers/token", "bytes/sequence")]
        for s in self.layer_sizes():
            per_token = "constant" if s.numbers_per_token is None else str(s.numbers_per_token)
            rows.append((str(s.layer), s.mixer, s.state, per_token, f"{s.nbytes_per_sequence:,}"))
        rows.append(("total", "", "", "", f"{self.nbytes_per_sequence():,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if c < 3 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
                 for r in rows]
        header = (f"cache: batch_size={self.batch_size}, max_len={self.max_len}, length={self.length}, "
                  f"{self.num_layers} layers")
        return "\n".join([header, *lines])

    def __repr__(self) -> str:
        return (f"StackCache(batch_size={self.batch_size}, max_len={self.max_len}, length={self.length}, "
                f"mixers={self.mixers})")
