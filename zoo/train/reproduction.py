"""The paper-comparison results as data, and their markdown tables.

One reproduction (one training budget) is a dict, written by tools/reproduce.py as
<out>/reproduction.json and collected for the docs in docs/results/reproduction.json:

    {"label": "400 steps", "command": "...", "wall_time_s": 2730.0,
     "tasks": {"symbol_soup": {
         "references": References.to_dict(),          # chance, shortcuts, ceiling on the test examples
         "models": {"sessa": {"layout": "S", "parameters": 153368, "tokens_seen": 1.6e6,
                              "wall_time_s": 330.0,
                              "seeds": {"0": {"accuracy": 0.049}, "1": {"accuracy": 0.119}},
                              "mean": {"accuracy": 0.084, ...}, "std": {"accuracy": 0.049, ...}}}}}}

`mean` / `std` (over seeds, sample std) hold every test metric, including Diffuse MQAR's lag
buckets. The tables put next to every model's test accuracy its fraction of the ceiling, and add
rows for chance, the best shortcut and the ceiling of the task at the lengths used.
"""

from __future__ import annotations

import math

from zoo.tasks.reference import METRIC, References
from zoo.train.sweep import mean_std

TASK_NAMES = {"symbol_soup": "SymbolSoup", "diffuse_mqar": "Diffuse MQAR"}
# The paper's Table 1 (test accuracy; model sizes and budgets not stated); absent: not reported.
PAPER = {"symbol_soup": {"sessa": 0.860, "attention": 0.792, "mamba2": 0.050},
         "diffuse_mqar": {"sessa": 0.154, "attention": 0.122, "mamba2": 0.002}}
LAYOUTS = {"sessa": "S", "attention": "A", "mamba2": "M", "sessa_attention": "SA", "sessa_mamba2": "SM",
           "sessa_nofb": "N"}
MODEL_NAMES = {"sessa": "Sessa", "attention": "attention", "mamba2": "Mamba-2", "sessa_attention": "Sessa / attention",
               "sessa_mamba2": "Sessa / Mamba-2", "sessa_nofb": "Sessa without feedback"}


def model_entry(variant: str, runs: list[dict]) -> dict:
    """One model's entry from its finished runs ({"seed", "final"} each, zoo.train.sweep.collect)."""
    tests = {str(r["seed"]): r["final"]["test"] for r in runs}
    names = list(dict.fromkeys(k for t in tests.values() for k in t if k != "loss"))
    stats = {k: mean_std([t[k] for t in tests.values() if k in t and not math.isnan(t[k])]) for k in names}
    stats = {k: v for k, v in stats.items() if not math.isnan(v[0])}
    return {"layout": LAYOUTS.get(variant, "?"), "parameters": runs[0]["final"]["parameters"],
            "tokens_seen": sum(r["final"]["tokens_per_s"] * r["final"]["train_time_s"] for r in runs) / len(runs),
            "wall_time_s": sum(r["final"]["wall_time_s"] for r in runs) / len(runs),
            "seeds": {s: {k: v for k, v in t.items() if k != "loss"} for s, t in tests.items()},
            "mean": {k: m for k, (m, _) in stats.items()}, "std": {k: s for k, (_, s) in stats.items()}}


def _acc(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _scaled(x: float | None, unit: float, suffix: str) -> str:
    return "–" if x is None else f"{x / unit:.{2 if suffix == 'M' else 1}f}{suffix}"


def _mean(model: dict, metric: str = METRIC) -> str:
    spread = f" ± {model['std'][metric]:.3f}" if len(model["seeds"]) > 1 else ""
    return f"{model['mean'][metric]:.3f}{spread}"


def _of_ceiling(value: float, refs: References | None) -> str:
    return f"{refs.fraction(value):.2f}" if refs else "–"


def _reference_rows(refs: References, width: int, value_at: int, fraction_at: int | None) -> list[str]:
    """Chance, best shortcut and ceiling as table rows of `width` cells: the value in cell `value_at`,
    its fraction of the ceiling in cell `fraction_at`."""
    lines = []
    for (label, cells), value in zip(refs.rows(3).items(), refs.row_values().values()):
        row = [""] * width
        row[0], row[value_at] = f"*{label}*", cells[METRIC]
        if fraction_at is not None:
            row[fraction_at] = f"{refs.fraction(value):.2f}"
        lines.append("| " + " | ".join(row) + " |")
    return lines


def references_of(entry: dict, task: str) -> References | None:
    d = entry["tasks"][task].get("references")
    return References.from_dict(d) if d else None


def task_table(entry: dict, task: str) -> str:
    """Per model: test accuracy per seed, mean ± std, fraction of the ceiling, the paper's number,
    parameters, tokens seen and wall time per run; then chance, best shortcut and ceiling."""
    data, refs = entry["tasks"][task], references_of(entry, task)
    head = ["model", "layout", "per seed", "mean ± std", "of ceiling", "paper", "parameters", "tokens seen / run",
            "wall time / run"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for variant, m in data["models"].items():
        seeds = ", ".join(f"{m['seeds'][s][METRIC]:.3f}" for s in sorted(m["seeds"], key=int))
        lines.append(f"| {MODEL_NAMES.get(variant, variant)} | {m['layout']} | {seeds} | {_mean(m)} | "
                     f"{_of_ceiling(m['mean'][METRIC], refs)} | {_acc(PAPER.get(task, {}).get(variant))} | "
                     f"{m['parameters']:,} | {_scaled(m['tokens_seen'], 1e6, 'M')} | {_scaled(m['wall_time_s'], 60, ' min')} |")
    if refs:
        lines += _reference_rows(refs, len(head), 3, 4)
    return "\n".join(lines)


def lag_buckets(entry: dict, task: str = "diffuse_mqar") -> list[str]:
    return list(dict.fromkeys(k for m in entry["tasks"][task]["models"].values() for k in m["mean"]
                              if k.startswith("accuracy_lag_")))


def bucket_name(metric: str) -> str:
    return metric.removeprefix("accuracy_lag_").replace("_", "–")


def lag_table(entry: dict, task: str = "diffuse_mqar") -> str:
    """Diffuse MQAR: mean test accuracy per lag bucket per model, then chance, best shortcut and ceiling."""
    data, refs, buckets = entry["tasks"][task], references_of(entry, task), lag_buckets(entry, task)
    lines = ["| model | " + " | ".join(bucket_name(b) for b in buckets) + " |", "|---" * (len(buckets) + 1) + "|"]
    for variant, m in data["models"].items():
        lines.append(f"| {MODEL_NAMES.get(variant, variant)} | " + " | ".join(_acc(m["mean"].get(b)) for b in buckets) + " |")
    if refs:
        for label, cells in refs.rows(3).items():
            lines.append(f"| *{label}* | " + " | ".join(cells.get(b, "–") for b in buckets) + " |")
    return "\n".join(lines)


def budgets_table(entries: list[dict], task: str, lags: bool = False, wall: bool = False) -> str:
    """One task across several budgets: per budget the seeds, mean ± std and fraction of the
    ceiling; optionally the last budget's lag buckets and wall time; the paper's number."""
    refs = references_of(entries[0], task)
    if any(references_of(e, task) != refs for e in entries[1:]):
        raise ValueError(f"the budgets of {task} were scored on different examples: one ceiling per table")
    last = entries[-1]
    buckets = lag_buckets(last, task) if lags else []
    head = ["model", "layout"]
    for e in entries:
        head += [f"{e['label']}: per seed", "mean ± std", "of ceiling"]
    head += [bucket_name(b) for b in buckets] + ([f"wall time / run ({last['label']})"] if wall else []) + ["paper"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for variant in last["tasks"][task]["models"]:
        models = [e["tasks"][task]["models"][variant] for e in entries]
        cells = [MODEL_NAMES.get(variant, variant), models[0]["layout"]]
        for m in models:
            cells += [", ".join(f"{m['seeds'][s][METRIC]:.3f}" for s in sorted(m["seeds"], key=int)), _mean(m),
                      _of_ceiling(m["mean"][METRIC], refs)]
        cells += [_acc(models[-1]["mean"].get(b)) for b in buckets]
        cells += [_scaled(models[-1]["wall_time_s"], 60, " min")] if wall else []
        lines.append("| " + " | ".join(cells + [_acc(PAPER.get(task, {}).get(variant))]) + " |")
    if refs:
        values = refs.row_values()
        for label, cells in refs.rows(3).items():
            row = [f"*{label}*"] + [""] * (len(head) - 1)
            for k in range(len(entries)):
                row[3 + 3 * k], row[4 + 3 * k] = cells[METRIC], f"{refs.fraction(values[label]):.2f}"
            for i, b in enumerate(buckets):
                row[2 + 3 * len(entries) + i] = cells.get(b, "–")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary_table(columns: list[tuple[str, dict, str]]) -> str:
    """Several (header, budget entry, task) columns side by side: mean ± std (fraction of the
    ceiling) per model, the paper's number after each task's columns, then chance, best shortcut
    and ceiling per column."""
    tasks = list(dict.fromkeys(t for _, _, t in columns))
    head = ["model"]
    for t in tasks:
        head += [h for h, _, task in columns if task == t] + [f"paper ({TASK_NAMES[t]})"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    variants = list(dict.fromkeys(v for _, e, t in columns for v in e["tasks"][t]["models"]))
    for variant in variants:
        cells = [MODEL_NAMES.get(variant, variant)]
        for t in tasks:
            for _, e, task in columns:
                if task == t:
                    m, refs = e["tasks"][t]["models"].get(variant), references_of(e, t)
                    cells.append(f"{_mean(m)} ({_of_ceiling(m['mean'][METRIC], refs)})" if m else "–")
            cells.append(_acc(PAPER[t].get(variant)))
        lines.append("| " + " | ".join(cells) + " |")
    for k, kind in enumerate(("chance", "best shortcut", "ceiling")):
        cells = [f"*{kind}*"]
        for t in tasks:
            for _, e, task in columns:
                if task == t:
                    refs = references_of(e, t)
                    label = list(refs.rows(3))[k]
                    name = f" ({label.split('(', 1)[1]}" if kind == "best shortcut" else ""
                    cells.append(refs.rows(3)[label][METRIC] + name)
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
