"""Names for mixers and blocks, so stacks can be written as patterns ("SASA") and gin files.

    from zoo.registry import register_mixer, register_block

    @register_mixer("conv", symbol="C")        # now usable as Stack(dim, "SCSC") and from gin as @MyConv
    class MyConv(Mixer):
        def __init__(self, dim: int, kernel: int = 4, backends=None): ...

    @register_block("prenorm")                 # Stack(dim, "SA", block="prenorm")
    class MyBlock(nn.Module):
        def __init__(self, dim: int, mixer: Callable[[int], Mixer]): ...

A mixer factory is called with the width: `factory(dim) -> Mixer`. A block factory is called as
`factory(dim, mixer=mixer_factory) -> nn.Module` with forward `(x, *, seq_idx, state)`.
The decorators return the class unchanged.

Hooks (`REGISTRY.add_hook`) see every entry, past and future; a hook may wrap the factory the
stack calls. zoo.gin_config uses this to make every registered mixer and block configurable,
including ones a user registers after gin was set up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal

Kind = Literal["mixer", "block"]
Factory = Callable[..., Any]
Hook = Callable[[Kind, str, Factory], Factory]


class UnknownNameError(KeyError):
    """A mixer or block name that is not registered (the message lists the valid ones)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Entry:
    """One registered mixer or block. `source` is what was registered; `factory` is what the
    stack calls (the source, possibly wrapped by hooks, e.g. into a gin configurable)."""

    kind: Kind
    name: str
    source: Factory
    factory: Factory
    symbol: str | None = None


def underlying_class(factory: Factory) -> Any:
    """The class (or function) behind a factory, looking through functools.partial."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


class Registry:
    """Mixers (name -> factory, optional one-letter pattern symbol) and blocks (name -> factory)."""

    def __init__(self) -> None:
        self.mixers: dict[str, Entry] = {}
        self.blocks: dict[str, Entry] = {}
        self._hooks: list[Hook] = []

    # ------------------------------------------------------------------ registration
    def add_mixer(self, name: str, factory: Factory, symbol: str | None = None) -> Entry:
        """Register mixer `name`; `symbol` (one character) makes it usable in layout patterns."""
        self._check_name("mixer", name, self.mixers, factory)
        if symbol is not None:
            if not isinstance(symbol, str) or len(symbol) != 1 or not symbol.isalnum():
                raise ValueError(f"mixer {name!r}: symbol must be one letter or digit; got {symbol!r}")
            owner = self.by_symbol().get(symbol)
            if owner is not None and owner.name != name:
                raise ValueError(f"mixer {name!r}: symbol {symbol!r} is already used by mixer {owner.name!r}; "
                                 f"used symbols: {self.symbols_text()}")
        return self._add(self.mixers, Entry("mixer", name, factory, factory, symbol))

    def add_block(self, name: str, factory: Factory) -> Entry:
        """Register block `name`: `factory(dim, mixer=mixer_factory) -> nn.Module`."""
        self._check_name("block", name, self.blocks, factory)
        return self._add(self.blocks, Entry("block", name, factory, factory))

    def add_hook(self, hook: Hook) -> None:
        """Call `hook(kind, name, factory) -> factory` on every entry now and on every later one."""
        self._hooks.append(hook)
        for entry in [*self.mixers.values(), *self.blocks.values()]:
            entry.factory = hook(entry.kind, entry.name, entry.factory)

    def _check_name(self, kind: str, name: str, table: dict[str, Entry], factory: Factory) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{kind} name must be a Python identifier; got {name!r}")
        if not callable(factory):
            raise TypeError(f"{kind} {name!r}: factory must be callable; got {factory!r}")
        if name in table and table[name].source is not factory:
            raise ValueError(f"{kind} {name!r} is already registered (to {table[name].source!r})")

    def _add(self, table: dict[str, Entry], entry: Entry) -> Entry:
        for hook in self._hooks:
            entry.factory = hook(entry.kind, entry.name, entry.factory)
        table[entry.name] = entry
        return entry

    # ------------------------------------------------------------------ lookup
    def mixer(self, name: str) -> Entry:
        if name not in self.mixers:
            raise UnknownNameError(f"unknown mixer {name!r}; valid: {', '.join(sorted(self.mixers))}")
        return self.mixers[name]

    def block(self, name: str) -> Entry:
        if name not in self.blocks:
            raise UnknownNameError(f"unknown block {name!r}; valid: {', '.join(sorted(self.blocks))}")
        return self.blocks[name]

    def by_symbol(self) -> dict[str, Entry]:
        return {e.symbol: e for e in self.mixers.values() if e.symbol is not None}

    def symbols_text(self) -> str:
        """'A=attention, M=mamba2, ...' for error messages."""
        return ", ".join(f"{s}={e.name}" for s, e in sorted(self.by_symbol().items()))

    def parse_pattern(self, pattern: str) -> list[Entry]:
        """'SASA' -> the mixer entries, one per layer; an invalid symbol is reported with its index."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"layout pattern must be a non-empty string of mixer symbols; got {pattern!r}")
        table = self.by_symbol()
        for i, symbol in enumerate(pattern):
            if symbol not in table:
                raise ValueError(f"layout {pattern!r}: unknown mixer symbol {symbol!r} at index {i}; "
                                 f"valid symbols: {self.symbols_text()}")
        return [table[s] for s in pattern]

    def mixer_name_of(self, module: Any) -> str | None:
        """The registered name of a built mixer module (by class; partials give their base name)."""
        matches = [e for e in self.mixers.values() if type(module) is underlying_class(e.source)]
        exact = [e for e in matches if not isinstance(e.source, functools.partial)]
        return (exact or matches)[0].name if matches else None

    def block_name_of(self, module: Any) -> str | None:
        return next((e.name for e in self.blocks.values() if type(module) is underlying_class(e.source)), None)


REGISTRY = Registry()


def register_mixer(name: str, symbol: str | None = None) -> Callable[[Factory], Factory]:
    """Decorator: register a mixer class (or factory `f(dim, ...)`) under `name` (and `symbol`)."""

    def deco(factory: Factory) -> Factory:
        REGISTRY.add_mixer(name, factory, symbol)
        return factory

    return deco


def register_block(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register a block class (or factory `f(dim, mixer=...)`) under `name`."""

    def deco(factory: Factory) -> Factory:
        REGISTRY.add_block(name, factory)
        return factory

    return deco


def _register_library() -> None:
    """The zoo's own mixers and blocks (blocks/ stays free of zoo imports)."""
    from blocks.attention import Attention
    from blocks.gated_block import GatedBlock
    from blocks.gated_deltanet import DeltaNet, GatedDeltaNet
    from blocks.gla import GatedLinearAttention
    from blocks.mamba2 import Mamba2
    from blocks.residual_block import ResidualBlock
    from blocks.retnet import MultiScaleRetention
    from blocks.sessa import Sessa
    from blocks.short_conv_mixer import ShortConv
    from blocks.sliding_window import SlidingWindowAttention

    REGISTRY.add_mixer("sessa", Sessa, "S")
    REGISTRY.add_mixer("attention", Attention, "A")
    REGISTRY.add_mixer("mamba2", Mamba2, "M")
    REGISTRY.add_mixer("sessa_nofb", functools.partial(Sessa, feedback=False), "N")  # the paper's ablation
    REGISTRY.add_mixer("sliding_window", SlidingWindowAttention, "W")
    REGISTRY.add_mixer("gated_deltanet", GatedDeltaNet, "G")
    REGISTRY.add_mixer("deltanet", DeltaNet, "D")
    REGISTRY.add_mixer("gla", GatedLinearAttention, "L")
    REGISTRY.add_mixer("retnet", MultiScaleRetention, "R")
    REGISTRY.add_mixer("short_conv", ShortConv, "K")  # zoology's BaseConv half of a recall hybrid ('KA')
    REGISTRY.add_block("gated", GatedBlock)
    REGISTRY.add_block("residual", ResidualBlock)


_register_library()
