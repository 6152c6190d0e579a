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
from zoo.cache import StackCache
from zoo.registry import REGISTRY

BlockFactory = Callable[[int], nn.Module]

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
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int; got dim={dim!r}")
        self.dim = dim
        if isinstance(layout, str):
            layers, names = self._from_pattern(dim, layout, block, num_layers)
            self.pattern: str | None = "".join(REGISTRY.mixer(n).symbol for n in names)
        else:
            layers, names = self._from_factories(dim, layout, block, num_layers)
            self.pattern = None
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
        if not factories or not all(callable(f) for f in factories):
            raise TypeError(f"layout must be a pattern string or a non-empty list of block factories; got {factories!r}")
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
        advanced in place; with a cache, x and seq_idx cover the new tokens only."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, {self.dim}); got {tuple(x.shape)}")
        if cache is not None:
            if not isinstance(cache, StackCache):
                raise TypeError(f"cache must be a StackCache (StackCache.allocate(model, ...)); got {type(cache).__name__}")
            if cache.num_layers != len(self.layers):
                raise ValueError(f"cache holds {cache.num_layers} layer states but the stack has {len(self.layers)} layers")
            cache.check(x.shape[0], x.shape[1])
        for i, layer in enumerate(self.layers):
            x = layer(x, seq_idx=seq_idx, state=None if cache is None else cache.states[i])
        return x

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
