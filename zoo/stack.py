"""A stack of blocks built from a layout: a pattern string ("SASA") or one block factory per layer.

    Stack(64, "SASA")                          # Sessa / attention interleaved, paper's GatedBlock
    Stack(64, "SA", num_layers=8)              # the pattern tiled to 8 layers: SASASASA
    Stack(64, "SM", block="residual")          # pre-norm residual blocks (mixer + MLP)
    Stack(64, [block_factory_0, block_factory_1])   # explicit: factory(dim) -> block, per layer

Pattern symbols come from the registry (zoo.registry: S=sessa, A=attention, M=mamba2,
N=sessa_nofb, W=sliding_window, G=gated_deltanet, D=deltanet, L=gla, R=retnet, plus user-registered
ones). With a pattern, layer i is built inside the config scope
`layer{i}`, so gin bindings such as `layer2/Attention.window = 64` change that layer only
(zoo.gin_config installs the scope; without gin the scope does nothing).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import Tensor, nn

from blocks.mixer import DecodeState, Mixer
from kernels.dispatch import AUTO, OPS
from kernels.packing import check_seq_idx
from zoo.cache import StackCache, layer_signature
from zoo.registry import REGISTRY

BlockFactory = Callable[[int], nn.Module]


class _NoGradientThroughCache(torch.autograd.Function):
    """Identity on the output of a cached (decoding) call; its backward explains why there is none."""

    @staticmethod
    def forward(ctx, out: Tensor, anchor: Tensor) -> Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError("no gradient flows through a decoding cache (cache=...): the cache is written in place "
                           "and keeps no autograd history. Compute gradients with a call without cache= (the "
                           "full sequence at once), or decode under torch.no_grad() / torch.inference_mode()")

_layer_scope: Callable[[str], ContextManager[Any]] = lambda name: contextlib.nullcontext()  # noqa: E731


def set_layer_scope(scope: Callable[[str], ContextManager[Any]]) -> None:
    """Install the context manager each pattern layer is built in (zoo.gin_config: gin.config_scope)."""
    global _layer_scope
    _layer_scope = scope


class Stack(nn.Module):
    """Layers (B, T, D) -> (B, T, D), no final norm (the model adds it).

    Args:
        dim: width D.
        layout: a pattern string, one registry symbol per layer (see module docstring), or a list of
            block factories `factory(dim) -> block` (e.g. gin references `[@layer0/GatedBlock, ...]`).
        block: with a pattern, the block every mixer is wrapped in: a registered name ("gated",
            "residual") or a factory `block(dim, mixer=mixer_factory)`; default "gated".
        num_layers: with a pattern, tile it to this many layers (a multiple of its length).
        backends: op name -> backend, a default pin for every mixer in the stack that calls the op
            (e.g. {"attention": "reference"}); a mixer's own `backends` pin wins over it.
    """

    def __init__(self, dim: int, layout: str | Sequence[BlockFactory], block: str | Callable[..., nn.Module] | None = None,
                 num_layers: int | None = None, backends: dict[str, str] | None = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int; got dim={dim!r}")
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)):
            raise ValueError(f"num_layers must be a positive int or None; got num_layers={num_layers!r}")
        if backends is not None and not isinstance(backends, dict):
            raise TypeError(f"backends must be a dict op -> backend name, e.g. {{'attention': 'sdpa'}}; got {backends!r}")
        self.dim = dim
        if isinstance(layout, str):
            layers, names = self._from_pattern(dim, layout, block, num_layers)
            self.pattern: str | None = "".join(REGISTRY.mixer(n).symbol for n in names)
        elif isinstance(layout, (list, tuple)):
            layers, names = self._from_factories(dim, layout, block, num_layers)
            self.pattern = None
        else:
            raise TypeError(f"layout must be a pattern string (e.g. 'SASA') or a list of block factories; got {layout!r}")
        self.layers = nn.ModuleList(layers)
        self._pin_defaults(backends or {})
        self.mixer_names: list[str | None] = names  # registry name of each layer's mixer (None: unregistered)

    @staticmethod
    def _from_pattern(dim: int, pattern: str, block: Any, num_layers: int | None) -> tuple[list[nn.Module], list[str]]:
        entries = REGISTRY.parse_pattern(pattern)
        if num_layers is not None:
            if num_layers < 1 or num_layers % len(pattern):
                raise ValueError(f"num_layers={num_layers} must be a positive multiple of the length of "
                                 f"layout {pattern!r} ({len(pattern)})")
            entries = entries * (num_layers // len(pattern))
        block_factory = REGISTRY.block(block or "gated").factory if isinstance(block, str) or block is None else block
        if not callable(block_factory):
            raise TypeError(f"block must be a registered block name or a callable; got {block!r}")
        layers = []
        for i, entry in enumerate(entries):
            with _layer_scope(f"layer{i}"):
                layers.append(block_factory(dim, mixer=entry.factory))
        return layers, [e.name for e in entries]

    @staticmethod
    def _from_factories(dim: int, factories: Sequence[BlockFactory], block: Any,
                        num_layers: int | None) -> tuple[list[nn.Module], list[str | None]]:
        factories = list(factories)
        if not factories or not all(callable(f) and not isinstance(f, str) for f in factories):
            raise TypeError(f"layout must be a pattern string or a non-empty list of block factories "
                            f"factory(dim) -> block (not names: a pattern string takes the registered symbols); "
                            f"got {factories!r}")
        if block is not None:
            raise ValueError(f"block={block!r} applies to pattern layouts only; with a list layout each factory "
                             "builds its own block")
        if num_layers is not None and num_layers != len(factories):
            raise ValueError(f"num_layers={num_layers} but the layout lists {len(factories)} layers")
        layers = [f(dim) for f in factories]
        return layers, [REGISTRY.mixer_name_of(getattr(layer, "mixer", None)) for layer in layers]

    def _pin_defaults(self, backends: dict[str, str]) -> None:
        """Set each mixer's unpinned ("auto") ops to the stack-wide default in `backends`."""
        for op, name in backends.items():
            if op not in OPS:
                raise ValueError(f"backends: unknown op {op!r}; valid ops: {', '.join(sorted(OPS))}")
            OPS[op].check_name(name)
        for module in self.layers.modules():
            if isinstance(module, Mixer):
                for op, name in backends.items():
                    if module.ops.get(op) == AUTO:
                        module.ops[op] = name

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, cache: StackCache | None = None) -> Tensor:
        """x (B, T, D) -> (B, T, D). seq_idx (B, T) segment ids; `cache` (zoo.cache.StackCache) is
        advanced in place; with a cache, x and seq_idx cover the new tokens only.

        Checked on every call (errors name the argument): x's shape, dtype (that of the parameters,
        unless autocast is on) and device; seq_idx's shape, dtype and contiguous segments; that the
        cache was allocated for this stack, and that decoding runs without autograd."""
        self._check_input(x)
        if seq_idx is not None:
            if isinstance(seq_idx, Tensor) and seq_idx.device != x.device:
                raise ValueError(f"seq_idx is on {seq_idx.device} but x is on {x.device}")
            check_seq_idx(seq_idx, tuple(x.shape[:2]))
        if cache is None:
            for layer in self.layers:
                x = layer(x, seq_idx=seq_idx)
            return x
        self._check_cache(cache, x)
        # the cache is written in place, so no gradient can flow through it: decode without autograd,
        # and if autograd was on, make a backward pass through the result fail with a clear message
        anchor = self._grad_anchor(x)
        with torch.no_grad():
            for layer, state in zip(self.layers, cache.states):
                x = layer(x, seq_idx=seq_idx, state=state)
        return x if anchor is None else _NoGradientThroughCache.apply(x, anchor)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor (B, T, {self.dim}); got {type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, {self.dim}); got {tuple(x.shape)}")
        p = next(self.parameters(), None)
        if p is None:
            return
        if x.device != p.device:
            raise ValueError(f"x is on {x.device} but the stack's parameters are on {p.device}: move one of them with .to()")
        if x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x has dtype {x.dtype} but the stack's parameters are {p.dtype}: cast one of them "
                             "(or run under torch.autocast)")

    def _check_cache(self, cache: StackCache, x: Tensor) -> None:
        if not isinstance(cache, StackCache):
            raise TypeError(f"cache must be a StackCache (StackCache.allocate(model, ...)); got {type(cache).__name__}")
        if cache.num_layers != len(self.layers):
            raise ValueError(f"cache holds {cache.num_layers} layer states but the stack has {len(self.layers)} layers")
        mine = self.signature()
        if cache.signature is not None and cache.signature != mine:
            theirs = cache.signature
            diff = next(i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b)
            raise ValueError(f"cache was allocated for another stack: its layer {diff} is {theirs[diff]} but this "
                             f"stack's layer {diff} is {mine[diff]}; allocate a cache for this model "
                             "(StackCache.allocate(model, ...))")
        cache.check(x.shape[0], x.shape[1])

    def _grad_anchor(self, x: Tensor) -> Tensor | None:
        """A tensor autograd would track (x, or a trainable parameter), or None when nothing is tracked."""
        if not torch.is_grad_enabled():
            return None
        if x.requires_grad:
            return x
        return next((p for p in self.parameters() if p.requires_grad), None)

    def signature(self) -> tuple[str, ...]:
        """One description per layer (mixer and its sizes): a cache fits the stacks with the same signature."""
        return tuple(layer_signature(layer) for layer in self.layers)

    def allocate_states(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> list[DecodeState]:
        """One fresh decoding state per layer, in layer order (zoo.cache.StackCache.allocate wraps them)."""
        return [layer.allocate_state(batch_size, max_len, device=device, dtype=dtype) for layer in self.layers]

    def example_inputs(self, batch_size: int = 1, seq_len: int = 8) -> tuple[tuple, dict]:
        """Random (args, kwargs) for a forward pass (used by zoo.summary)."""
        p = next(self.parameters())
        return (torch.randn(batch_size, seq_len, self.dim, device=p.device, dtype=p.dtype),), {}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, pattern={self.pattern!r}" if self.pattern else f"dim={self.dim}"
