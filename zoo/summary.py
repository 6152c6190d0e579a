"""A model summary: per layer the block, the mixer and its key options, the backend every op
actually runs with (measured by a tiny forward under kernels.record_choices), and parameters.

    from zoo.summary import summarize
    print(summarize(model))          # CausalLM, SequenceClassifier or Stack
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from kernels.dispatch import AUTO, record_choices
from zoo.models import CausalLM
from zoo.registry import REGISTRY
from zoo.stack import Stack


@dataclass
class LayerRow:
    index: int
    block: str
    mixer: str
    options: str
    backends: dict[str, list[str]]  # op -> backends dispatch chose in this layer (usually one)
    pinned: dict[str, str]  # op -> backend pinned for this layer
    params: int


@dataclass
class ModelSummary:
    title: str
    rows: list[LayerRow]
    other_params: dict[str, int]  # top-level parts outside the stack (embedding, norm, head)
    total_params: int
    trainable_params: int
    seq_len: int
    grad: bool
    pattern: str | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        header = ("#", "block", "mixer", "options", "backends", "params")
        cells = [(str(r.index), r.block, r.mixer, r.options or "-", _backends_text(r), f"{r.params:,}") for r in self.rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
        line = lambda c: "  ".join(s.rjust(w) if i in (0, 5) else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))).rstrip()  # noqa: E731
        out = [self.title, line(header), line(["-" * w for w in widths])]
        out += [line(c) for c in cells]
        out.append("")
        for name, n in self.other_params.items():
            out.append(f"{name}: {n:,} params")
        out.append(f"layers: {sum(r.params for r in self.rows):,} params")
        out.append(f"total: {self.total_params:,} params ({self.trainable_params:,} trainable)")
        mode = "training (grad enabled)" if self.grad else "inference (no grad)"
        out.append(f"backends: chosen by dispatch for a {mode} forward at T={self.seq_len}; * = pinned for this layer")
        out += self.notes
        return "\n".join(out)


def _backends_text(row: LayerRow) -> str:
    parts = []
    for op, names in row.backends.items():
        star = "*" if op in row.pinned else ""
        parts.append(f"{op}={'/'.join(names)}{star}")
    return " ".join(parts) or "-"


def _signature_defaults(cls: type) -> dict[str, object]:
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}


def mixer_options(mixer: nn.Module) -> str:
    """Key options of a mixer that differ from its constructor defaults (num_heads always shown).

    Read from the mixer's own `extra_repr` when it defines one, else from attributes named like
    its constructor arguments."""
    defaults = _signature_defaults(type(mixer))
    if type(mixer).extra_repr is not nn.Module.extra_repr:
        pairs = re.findall(r"(\w+)=(.*?)(?=, \w+=|$)", mixer.extra_repr())
    else:
        pairs = [(n, repr(getattr(mixer, n))) for n in defaults
                 if isinstance(getattr(mixer, n, object()), (bool, int, float, str, type(None)))]
    values = dict(pairs)
    keep = []
    for name, value in pairs:
        if name in ("dim", "backends"):
            continue
        if name == "num_kv_heads" and value == values.get("num_heads"):
            continue
        if name == "num_heads" or name not in defaults or repr(defaults[name]) != value:
            keep.append(f"{name}={value}")
    if "num_heads" not in values and isinstance(getattr(mixer, "num_heads", None), int):
        keep.insert(0, f"num_heads={mixer.num_heads}")
    return " ".join(keep)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize(model: nn.Module, *, seq_len: int = 8, grad: bool = True) -> ModelSummary:
    """Summarize a CausalLM / SequenceClassifier (anything with `.stack` and `example_inputs`) or a Stack.

    Runs one forward on random inputs of length `seq_len` (batch 1) with gradients enabled if
    `grad`, recording per layer which backend dispatch picks for each op. A pinned backend that
    cannot run raises kernels.BackendError listing every backend and its reason."""
    stack = model if isinstance(model, Stack) else getattr(model, "stack", None)
    if not isinstance(stack, Stack):
        raise TypeError(f"summarize needs a Stack or a model with a .stack Stack; got {type(model).__name__}")
    choices: dict[int, list[tuple[str, str]]] = {}
    open_records: dict[int, object] = {}

    def enter(i: int):
        def hook(module, args):
            open_records[i] = record_choices()
            choices[i] = open_records[i].__enter__()
        return hook

    def leave(i: int):
        def hook(module, args, output):
            open_records.pop(i).__exit__(None, None, None)
        return hook

    handles = []
    for i, layer in enumerate(stack.layers):
        handles.append(layer.register_forward_pre_hook(enter(i)))
        handles.append(layer.register_forward_hook(leave(i)))
    try:
        args, kwargs = model.example_inputs(1, seq_len)
        with torch.set_grad_enabled(grad):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for rec in open_records.values():  # a forward that raised leaves its layer's record open
            rec.__exit__(None, None, None)

    rows = []
    for i, layer in enumerate(stack.layers):
        mixer = getattr(layer, "mixer", None)
        used: dict[str, list[str]] = {}
        for op, backend in choices.get(i, []):
            if backend not in used.setdefault(op, []):
                used[op].append(backend)
        ops = getattr(mixer, "ops", {}) or {}
        rows.append(LayerRow(
            index=i,
            block=REGISTRY.block_name_of(layer) or type(layer).__name__,
            mixer=stack.mixer_names[i] or (type(mixer).__name__ if mixer is not None else "-"),
            options=mixer_options(mixer) if mixer is not None else "",
            backends=used,
            pinned={op: b for op, b in ops.items() if b != AUTO},
            params=_count(layer),
        ))

    other = {} if model is stack else {name: _count(child) for name, child in model.named_children() if child is not stack}
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dims = [f"{label} {getattr(model, attr)}" for attr, label in (("vocab_size", "vocab"), ("num_classes", "classes"))
            if hasattr(model, attr)]
    dims += [f"dim {stack.dim}", f"{len(stack.layers)} layers"]
    if stack.pattern:
        dims.append(f"pattern {stack.pattern}")
    notes = ["the output head is tied to the embedding (no extra parameters)"] if isinstance(model, CausalLM) else []
    return ModelSummary(title=f"{type(model).__name__}: " + ", ".join(dims), rows=rows, other_params=other,
                        total_params=total, trainable_params=trainable, seq_len=seq_len, grad=grad,
                        pattern=stack.pattern, notes=notes)
