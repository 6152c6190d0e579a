"""The recall comparison as data: MQAR accuracy of every mixer against its width and its decoding
state, and the table and figure made from it (tools/recall.py runs it; docs/recall.md shows it).

One comparison is a dict, written by tools/recall.py as <out>/recall.json and kept for the docs in
docs/results/recall.json:

    {"command": "...", "wall_time_s": 4100.0, "seq_len": 64, "task": "MQAR ...",
     "references": References.to_dict(),      # chance, shortcuts, ceiling on the same test examples
     "models": {"attention": {"name": "attention", "layout": "KA", "widths": {"64": {
         "parameters": 100224, "state_per_layer": 8448, "state_kind": "grows: 128 per token",
         "seeds": {"0": 0.99, "1": 0.98}, "mean": 0.985, "std": 0.007, "wall_time_s": 300.0}}}}}

The decoding state per layer is what zoo.cache.StackCache allocates for one sequence of `seq_len`
tokens: the floating-point tensors of every layer's state (its segment-id bookkeeping left out),
summed over the stack and divided by the number of layers that are not short convolutions, so that
a (short convolution, mixer) pair counts as one layer, as in zoology. A cache that grows holds
numbers-per-token x seq_len (checked against the mixer's own `state_numbers_per_token`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from zoo.cache import StackCache
from zoo.plots import pyplot, save_figure
from zoo.tasks.reference import METRIC, References
from zoo.train.sweep import mean_std

CONV = "short_conv"  # the registered name of the short convolution that pairs with each mixer


def state_numbers(model: nn.Module, seq_len: int) -> dict:
    """The decoding state of one sequence of `seq_len` tokens, from the cache the model allocates.

    Returns {"per_layer": numbers per (short convolution, mixer) layer, "layers": [(mixer name,
    numbers, numbers per token or None)] in stack order}."""
    cache = StackCache.allocate(model, batch_size=1, max_len=seq_len, device="cpu", dtype=torch.float32)
    layers = []
    for state, size in zip(cache.states, cache.layer_sizes()):
        numbers = sum(t.numel() for t in vars(state).values() if isinstance(t, torch.Tensor) and t.is_floating_point())
        if size.numbers_per_token is not None and numbers != size.numbers_per_token * seq_len:
            raise RuntimeError(f"layer {size.layer} ({size.mixer}) allocates {numbers} numbers for {seq_len} tokens, "
                               f"not {size.numbers_per_token} per token")
        layers.append((size.mixer, numbers, size.numbers_per_token))
    mixers = sum(1 for name, _, _ in layers if name != CONV) or len(layers)
    return {"per_layer": sum(n for _, n, _ in layers) / mixers, "layers": layers}


def state_kind(layers: list) -> str:
    """In words: how the state of a stack's mixers grows ("grows: 128 per token", "constant", or both)."""
    growing = sorted({per for name, _, per in layers if per is not None and name != CONV})
    if not growing:
        return "constant"
    return "grows: " + " / ".join(f"{p} per token" for p in growing) + (
        " (+ constant)" if any(per is None and name != CONV for name, _, per in layers) else "")


def width_entry(runs: list[dict], state: dict) -> dict:
    """One (model, width) cell from its finished runs ({"seed", "final"} each) and state_numbers()."""
    accs = {str(r["seed"]): r["final"]["test"][METRIC] for r in runs}
    m, s = mean_std(list(accs.values()))
    return {"parameters": runs[0]["final"]["parameters"], "state_per_layer": state["per_layer"],
            "state_kind": state_kind(state["layers"]), "seeds": accs, "mean": m, "std": s,
            "wall_time_s": sum(r["final"]["wall_time_s"] for r in runs) / len(runs)}


def _numbers(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


def table(entry: dict) -> str:
    """Markdown: per model and width, test accuracy (mean ± std over seeds, seeds in brackets when
    two or more) and the decoding state per layer; then chance, best shortcut and ceiling."""
    widths = sorted({int(w) for m in entry["models"].values() for w in m["widths"]})
    head = ["model", "layout"] + [c for w in widths for c in (f"D = {w}: accuracy", "state / layer", "parameters")]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m in entry["models"].values():
        cells = [m["name"], m["layout"]]
        for w in widths:
            c = m["widths"].get(str(w))
            if c is None:
                cells += ["–", "–", "–"]
                continue
            spread = f" ± {c['std']:.3f}" if len(c["seeds"]) > 1 else ""
            seeds = " (" + ", ".join(f"{c['seeds'][s]:.3f}" for s in sorted(c["seeds"], key=int)) + ")" if spread else ""
            cells += [f"{c['mean']:.3f}{spread}{seeds}", _numbers(c["state_per_layer"]), f"{c['parameters']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    refs = References.from_dict(entry["references"]) if entry.get("references") else None
    if refs:
        for label, cells in refs.rows(3).items():
            row = [f"*{label}*", ""] + [x for _ in widths for x in (cells[METRIC], "", "")]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(entry: dict, path: str | Path) -> Path:
    """Two panels: test accuracy against the decoding state per layer (log axis; one line per model
    through its widths, dots: seeds) and against the width; chance, the best shortcut and the
    ceiling as grey lines."""
    plt = pyplot()

    fig, (ax_state, ax_width) = plt.subplots(1, 2, figsize=(12, 4.6))
    markers = "osD^v<>ph*"
    for i, m in enumerate(entry["models"].values()):
        cells = sorted(((int(w), c) for w, c in m["widths"].items()), key=lambda wc: wc[0])
        style = dict(color=f"C{i % 10}", marker=markers[i % len(markers)], label=f"{m['name']} ({m['layout']})")
        for ax, x in ((ax_state, [c["state_per_layer"] for _, c in cells]), (ax_width, [w for w, _ in cells])):
            ax.plot(x, [c["mean"] for _, c in cells], "-", ms=6, **style)
            for xi, (_, c) in zip(x, cells):
                ax.plot([xi] * len(c["seeds"]), list(c["seeds"].values()), ".", color=style["color"], ms=3, alpha=0.6)
            style.pop("label", None)
    refs = References.from_dict(entry["references"]) if entry.get("references") else None
    for ax in (ax_state, ax_width):
        if refs:
            ax.axhline(refs.chance, color="grey", ls=":", lw=1)
            ax.axhline(refs.best_shortcut()[1].value, color="grey", ls="-.", lw=1)
            ax.axhline(refs.ceiling[METRIC].value, color="grey", ls="--", lw=1)
        ax.set_ylabel("MQAR test accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3, which="both")
    ax_state.set_xscale("log")
    ax_state.set_xlabel(f"decoding state per layer at T = {entry['seq_len']} (numbers)")
    widths = sorted({int(w) for m in entry["models"].values() for w in m["widths"]})
    ax_width.set_xscale("log", base=2)
    ax_width.set_xticks(widths, [str(w) for w in widths])
    ax_width.set_xlabel("model width D")
    ax_state.legend(fontsize=7, loc="best")
    seeds = sorted({int(s) for m in entry["models"].values() for c in m["widths"].values() for s in c["seeds"]})
    fig.suptitle(f"{entry['task']}: mean over seeds {seeds} (dots: seeds; grey: chance, "
                 f"best shortcut ({refs.best_shortcut()[0] if refs else '–'}), ceiling)",
                 fontsize=10)
    return save_figure(fig, path)


def check_entry(entry: dict) -> None:
    """Raise ValueError naming the first missing or malformed field of a comparison entry."""
    for key in ("command", "seq_len", "task", "models"):
        if key not in entry:
            raise ValueError(f"recall results: missing {key!r}")
    for name, m in entry["models"].items():
        for key in ("name", "layout", "widths"):
            if key not in m:
                raise ValueError(f"recall results: model {name!r} misses {key!r}")
        for w, c in m["widths"].items():
            if not (isinstance(c.get("state_per_layer"), (int, float)) and math.isfinite(c["mean"])):
                raise ValueError(f"recall results: model {name!r} width {w}: bad state_per_layer or mean")
