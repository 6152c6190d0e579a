"""The mixer contract and the decoding-state bookkeeping every mixer shares.

A mixer maps x (B, T, D) -> (B, T, D) causally:

    y = mixer(x)                                  # training / full forward
    y = mixer(x, seq_idx=ids)                     # packed documents or left padding (kernels.packing)
    state = mixer.allocate_state(B, max_len)      # decoding: the mixer owns its state
    y = mixer(prompt, state=state)                # prefill in one parallel pass
    y = mixer(next_tokens, state=state)           # advance by one token or a chunk

With a state, `seq_idx` (B, T) names the segments of the *new* tokens only; None continues each
row's last segment. `state.reorder(index)` reorders the batch (beam search).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor, nn

from kernels.dispatch import AUTO, check_pin
from kernels.packing import segment_positions


@dataclass
class DecodeState:
    """Base of every mixer's decoding state: per-row segment bookkeeping and capacity checks.

    Subclasses add their own tensors (batch first); `reorder` and `nbytes_per_sequence` cover them.
    """

    max_len: int
    seq_idx: Tensor  # (B, max_len) int64 segment ids of the tokens seen so far
    next_pos: Tensor  # (B,) int64 position inside its segment of the next token
    length: int = 0  # tokens seen so far (same for every row)

    @classmethod
    def track(cls, batch_size: int, max_len: int, device: torch.device | str | None = None) -> dict:
        """The bookkeeping fields for a fresh state."""
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1; got batch_size={batch_size}, max_len={max_len}")
        return dict(max_len=max_len, seq_idx=torch.zeros(batch_size, max_len, dtype=torch.long, device=device),
                    next_pos=torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.seq_idx.shape[0]

    def begin(self, x: Tensor, seq_idx: Tensor | None) -> tuple[Tensor, Tensor]:
        """Validate new input x (B, T, ...) -> (seq_idx of the new tokens (B, T), their positions (B, T))."""
        B, T = x.shape[:2]
        if B != self.batch_size:
            raise ValueError(f"state was allocated for batch {self.batch_size}, got input batch {B}")
        if self.length + T > self.max_len:
            raise ValueError(f"state holds {self.length} of max_len={self.max_len} tokens; "
                             f"cannot add {T} more (allocate a longer state)")
        if seq_idx is None:  # each row continues its last segment (segment 0 in a fresh state)
            last = self.seq_idx[:, self.length - 1] if self.length else torch.zeros_like(self.next_pos)
            return last[:, None].expand(B, T), self.next_pos[:, None] + torch.arange(T, device=x.device)
        if tuple(seq_idx.shape) != (B, T):
            raise ValueError(f"with a state, seq_idx must be (B, T) = {(B, T)} for the new tokens; got {tuple(seq_idx.shape)}")
        if self.length:
            positions = segment_positions(seq_idx, self.seq_idx[:, self.length - 1], self.next_pos)
        else:
            positions = segment_positions(seq_idx)
        return seq_idx, positions

    def commit(self, seq_idx: Tensor, positions: Tensor) -> None:
        """Record T new tokens (after the mixer stored its own tensors at [length, length + T))."""
        T = seq_idx.shape[1]
        self.seq_idx[:, self.length:self.length + T] = seq_idx
        self.next_pos = positions[:, -1] + 1
        self.length += T

    @property
    def past_seq_idx(self) -> Tensor:
        return self.seq_idx[:, :self.length]

    def reorder(self, index: Tensor) -> None:
        """Reorder (or select) batch rows in place, e.g. for beam search."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                setattr(self, f.name, value.index_select(0, index.to(value.device)))

    def nbytes_per_sequence(self) -> int:
        """Bytes this state holds per sequence at its allocated max_len (bookkeeping included)."""
        total = sum(getattr(self, f.name).nbytes for f in fields(self) if isinstance(getattr(self, f.name), Tensor))
        return total // self.batch_size


# What every registered mixer is tested for (tests/registry_mixers.py drives the tests from the registry).
INVARIANTS = {
    "causal": "an output never depends on later inputs",
    "gradients": "gradients reach every parameter, in either block",
    "decode": "decoding with a state (token by token, prefill + steps, chunked prefill, left padding) "
              "equals the full forward pass",
    "packing": "packed sequences (seq_idx) equal each sequence run alone, forward and gradients",
    "backends": "a stack's output and gradients do not depend on the backends its ops run on",
}


class Mixer(nn.Module):
    """Base class: a causal token mixer (B, T, D) -> (B, T, D) that owns its decoding state.

    Subclasses set `self.dim`, implement `forward(x, *, seq_idx=None, state=None)`,
    `allocate_state(batch_size, max_len, device=None, dtype=None)`, and list the ops they call in
    `ops` (op name -> backend pinned for this layer, "auto" by default). A mixer that cannot meet
    one of the INVARIANTS declares it in `invariant_exemptions` ({invariant: reason}); the tests
    then skip that invariant for it and report the reason.
    """

    ops: dict[str, str]
    invariant_exemptions: ClassVar[dict[str, str]] = {}

    def allocate_state(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> DecodeState:
        raise NotImplementedError(f"{type(self).__name__} does not support decoding")

    def state_numbers_per_token(self) -> int | None:
        """Numbers the decoding state grows by per token (None for constant-size states)."""
        return None


def check_backends(mixer: str, backends: dict[str, str] | None, uses: tuple[str, ...]) -> dict[str, str]:
    """Validate a per-layer `backends` pin dict (op name -> backend name) -> {op: backend} for every op in `uses`.

    Unknown ops, ops this mixer does not call and unknown backend names raise ValueError listing the valid ones.
    """
    backends = dict(backends or {})
    for op, name in backends.items():
        check_pin(op, name, f"{mixer}: backends[{op!r}]")
        if op not in uses:
            raise ValueError(f"{mixer}: backends names op {op!r}, which this mixer does not call; it calls: {', '.join(uses)}")
    return {op: backends.get(op, AUTO) for op in uses}


def check_positive_ints(mixer: str, **values: object) -> None:
    """Raise ValueError naming the first argument that is not a positive int (bools rejected)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{mixer}: {name} must be a positive int; got {name}={value!r}")


def head_dims(dim: int, num_heads: int, num_kv_heads: int | None, rope: bool) -> tuple[int, int]:
    """Validate a multi-head layout -> (num_kv_heads, head_dim); errors name the argument."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if dim < 1:
        raise ValueError(f"dim must be >= 1; got dim={dim}")
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must be >= 1 and divide dim={dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must be >= 1 and divide num_heads={num_heads}")
    head_dim = dim // num_heads
    if rope and head_dim % 2:
        raise ValueError(f"rope=True needs an even head dim; dim={dim} / num_heads={num_heads} = {head_dim}")
    return num_kv_heads, head_dim
