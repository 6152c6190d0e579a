"""Models around a Stack: a causal language model and a sequence classifier.

    lm = CausalLM(vocab_size=256, dim=64, stack=lambda d: Stack(d, "SASA"))
    logits = lm(tokens)                                   # (B, T) long -> (B, T, V)
    logits = lm(tokens, cu_seqlens=cu)                    # packed documents in one row (B = 1)

    clf = SequenceClassifier(vocab_size=25, num_classes=20, dim=64, stack=lambda d: Stack(d, "SA"))
    logits = clf(tokens, positions)                       # read out at positions (B,) -> (B, C)

`stack` is a factory called with the width (a gin reference `@Stack` in configs) or a built Stack.
"""

from __future__ import annotations

from typing import Callable

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blocks.norms import make_norm
from kernels.packing import check_seq_idx, seq_idx_from_cu_seqlens
from zoo.cache import StackCache
from zoo.stack import Stack


def _build_stack(stack: Stack | Callable[[int], Stack], dim: int) -> Stack:
    if isinstance(stack, str) or not (isinstance(stack, nn.Module) or callable(stack)):
        raise TypeError(f"stack must be a factory stack(dim) -> Stack (e.g. functools.partial(Stack, layout='SA'), "
                        f"or @Stack in gin) or a built Stack; got {stack!r}")
    built = stack if isinstance(stack, nn.Module) else stack(dim)
    if getattr(built, "dim", dim) != dim:
        raise ValueError(f"stack has width {built.dim} but the model has dim={dim}")
    return built


def check_sizes(owner: str, **sizes) -> None:
    """Each value must be an int >= 1; errors name the argument."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1; got {name}={value!r}")


def check_positive(owner: str, **values) -> None:
    """Each value must be a finite number > 0; errors name the argument."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{owner}: {name} must be a finite number > 0; got {name}={value!r}")


def check_tokens(tokens: Tensor, vocab_size: int, name: str = "tokens", device: torch.device | None = None) -> None:
    """tokens must be a (B, T) torch.long tensor of ids in [0, vocab_size) (on `device` if given);
    errors name the argument."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tokens).__name__}")
    if tokens.dtype != torch.long:
        raise TypeError(f"{name} must have dtype torch.long; got {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"{name} must be (B, T) with T >= 1; got shape {tuple(tokens.shape)}")
    if device is not None and tokens.device != device:
        raise ValueError(f"{name} is on {tokens.device} but the model is on {device}: move one of them with .to()")
    if tokens.numel() and not torch.compiler.is_compiling():  # a host sync: skipped in compiled graphs
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}); got values in [{lo}, {hi}]")


def _check_seq_idx(seq_idx: Tensor | None, tokens: Tensor) -> None:
    """dtype, shape and device (the stack checks that the segments are contiguous)."""
    if seq_idx is not None:
        check_seq_idx(seq_idx, tuple(tokens.shape), contiguous=False)
        if seq_idx.device != tokens.device:
            raise ValueError(f"seq_idx is on {seq_idx.device} but tokens are on {tokens.device}")


class CausalLM(nn.Module):
    """Embedding -> Stack -> final norm -> head (the embedding, tied). tokens (B, T) -> logits (B, T, V).

    Args:
        vocab_size: V.
        dim: width D.
        stack: factory `stack(dim) -> Stack` (or a built Stack of width dim).
        ln_eps: final norm epsilon.
        embed_std: standard deviation of the (tied) embedding's normal initialisation.
        norm: the final norm, a name in blocks.norms.NORMS ("layernorm", "rmsnorm").
        tie_embeddings: the head is the embedding matrix; False gives a separate `head` Linear(D, V).
    """

    def __init__(self, vocab_size: int, dim: int, stack: Stack | Callable[[int], Stack], ln_eps: float = 1e-5,
                 embed_std: float = 0.02, norm: str = "layernorm", tie_embeddings: bool = True):
        super().__init__()
        check_sizes("CausalLM", vocab_size=vocab_size, dim=dim)
        check_positive("CausalLM", ln_eps=ln_eps, embed_std=embed_std)
        self.vocab_size, self.dim = vocab_size, dim
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=embed_std)
        self.stack = _build_stack(stack, dim)
        self.norm = make_norm(norm, dim, ln_eps)
        self.head = None if tie_embeddings else nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: Tensor, *, seq_idx: Tensor | None = None, cu_seqlens: Tensor | None = None,
                cache: StackCache | None = None) -> Tensor:
        """tokens (B, T) long -> logits (B, T, V).

        seq_idx (B, T) long: segment ids (packing, left padding; kernels.packing).
        cu_seqlens (N + 1,): packed documents in one row (B must be 1); exclusive with seq_idx.
        cache: decoding cache (zoo.cache.StackCache.allocate(model, ...)), advanced in place; tokens
            and seq_idx are then the new tokens only.
        """
        check_tokens(tokens, self.vocab_size, device=self.embed.weight.device)
        if cu_seqlens is not None:
            if seq_idx is not None:
                raise ValueError("give either seq_idx or cu_seqlens, not both")
            if tokens.shape[0] != 1:
                raise ValueError(f"cu_seqlens packs documents into one row: tokens must be (1, T); got {tuple(tokens.shape)}")
            if not isinstance(cu_seqlens, Tensor):
                raise TypeError(f"cu_seqlens must be a 1-D integer torch.Tensor, e.g. torch.tensor([0, 5, 9]); "
                                f"got {type(cu_seqlens).__name__}")
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens.to(tokens.device), tokens.shape[1])
        _check_seq_idx(seq_idx, tokens)
        h = self.stack(self.embed(tokens), seq_idx=seq_idx, cache=cache)
        h = self.norm(h.to(self.norm.weight.dtype))  # a float32 residual stream (residual_in_fp32) meets the model's dtype
        return F.linear(h, self.embed.weight if self.head is None else self.head.weight)

    def example_inputs(self, batch_size: int = 1, seq_len: int = 8) -> tuple[tuple, dict]:
        """Random (args, kwargs) for a forward pass (used by zoo.summary)."""
        return (torch.randint(self.vocab_size, (batch_size, seq_len), device=self.embed.weight.device),), {}


class SequenceClassifier(nn.Module):
    """Embedding -> Stack -> LayerNorm -> Linear(D, C) read at one marked position per row.

    Args:
        vocab_size: V.
        num_classes: C.
        dim: width D.
        stack: factory `stack(dim) -> Stack` (or a built Stack of width dim).
        ln_eps: final LayerNorm epsilon.
        embed_std: standard deviation of the embedding's normal initialisation.
    """

    def __init__(self, vocab_size: int, num_classes: int, dim: int, stack: Stack | Callable[[int], Stack],
                 ln_eps: float = 1e-5, embed_std: float = 0.02):
        super().__init__()
        check_sizes("SequenceClassifier", vocab_size=vocab_size, num_classes=num_classes, dim=dim)
        check_positive("SequenceClassifier", ln_eps=ln_eps, embed_std=embed_std)
        self.vocab_size, self.num_classes, self.dim = vocab_size, num_classes, dim
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=embed_std)
        self.stack = _build_stack(stack, dim)
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor, positions: Tensor, *, seq_idx: Tensor | None = None) -> Tensor:
        """tokens (B, T) long, positions (B,) long index of the readout step in each row -> logits (B, C).

        seq_idx (B, T) long: segment ids (e.g. left padding with pads = -1)."""
        check_tokens(tokens, self.vocab_size, device=self.embed.weight.device)
        B, T = tokens.shape
        if not isinstance(positions, Tensor) or positions.dtype != torch.long or tuple(positions.shape) != (B,):
            got = f"{positions.dtype} {tuple(positions.shape)}" if isinstance(positions, Tensor) else type(positions).__name__
            raise ValueError(f"positions must be a torch.long tensor of shape (B,) = ({B},); got {got}")
        if bool(((positions < 0) | (positions >= T)).any()):
            raise ValueError(f"positions must lie in [0, T={T}); got {positions.tolist()}")
        _check_seq_idx(seq_idx, tokens)
        h = self.stack(self.embed(tokens), seq_idx=seq_idx)
        h = h[torch.arange(B, device=h.device), positions.to(h.device)]  # (B, D)
        return self.head(self.norm(h))

    def example_inputs(self, batch_size: int = 1, seq_len: int = 8) -> tuple[tuple, dict]:
        """Random (args, kwargs) for a forward pass (used by zoo.summary)."""
        device = self.embed.weight.device
        tokens = torch.randint(self.vocab_size, (batch_size, seq_len), device=device)
        return (tokens, torch.full((batch_size,), seq_len - 1, device=device)), {}
