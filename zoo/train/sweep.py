"""Sweeps: variants (lists of gin files) x seeds, trained one after another, then one markdown
table (mean ± std over seeds of every final metric, parameters, tokens/s; with the task's chance,
best shortcut and ceiling, and each accuracy as a fraction of the ceiling) and one comparison plot.

    spec = SweepSpec(variants={"sessa": ["experiments/paper_comparison/sessa.gin"], ...},
                     gin_files=["experiments/paper_comparison/symbol_soup.gin"], seeds=[0, 1])
    tools/sweep.py drives it (run folders: <out>/<variant>/seed<k>/); this module holds the
    plain parts: the spec, collecting finished runs, the table and the plot.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.tasks.reference import METRIC, References
from zoo.train.run_dir import read_final, read_metrics
from zoo.plots import pyplot, save_figure

SUMMARY_KEYS = ("parameters", "tokens_per_s")


@dataclass
class SweepSpec:
    """variants: name -> gin files (applied in order, after `gin_files`); seeds: TrainConfig.seed
    values; gin_files / gin_params: shared by every run (gin_params applied last).
    metric: the validation/test metric the plot compares (None: the task's first metric)."""

    variants: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    gin_files: list[str] = field(default_factory=list)
    gin_params: list[str] = field(default_factory=list)
    metric: str | None = None

    def __post_init__(self):
        if not self.variants:
            raise ValueError("a sweep needs at least one variant (SweepSpec.variants = {'name': ['file.gin'], ...})")
        self.variants = {str(k): [v] if isinstance(v, str) else list(v) for k, v in self.variants.items()}
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds:
            raise ValueError("a sweep needs at least one seed")


def run_folder(out: str | Path, variant: str, seed: int) -> Path:
    return Path(out) / variant / f"seed{seed}"


def collect(out: str | Path, spec: SweepSpec) -> list[dict]:
    """Finished runs of the sweep: {"variant", "seed", "final", "curve"} each."""
    results = []
    for variant in spec.variants:
        for seed in spec.seeds:
            folder = run_folder(out, variant, seed)
            if (folder / "final_metrics.json").exists():
                results.append({"variant": variant, "seed": seed, "final": read_final(folder),
                                "curve": [r for r in read_metrics(folder) if r.get("split") == "validation"]})
    return results


def _flatten(final: dict) -> dict[str, float]:
    """{"test": {"accuracy": a}, "parameters": p, ...} -> {"test accuracy": a, "parameters": p, ...}."""
    flat = {k: final[k] for k in SUMMARY_KEYS if isinstance(final.get(k), (int, float))}
    for split in ("test", "validation"):
        for name, value in final.get(split, {}).items():
            flat[f"{split} {name}"] = value
    return flat


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def _fmt(name: str, m: float, s: float, n: int) -> str:
    if name == "parameters":
        return f"{m:,.0f}"
    if name == "tokens_per_s":
        return f"{m:,.0f}" + (f" ± {s:,.0f}" if n > 1 else "")
    return f"{m:.4f}" + (f" ± {s:.4f}" if n > 1 else "")


def table(results: list[dict], references: dict[str, References] | None = None, split: str = "test") -> str:
    """Markdown table: one row per variant, mean ± std over its seeds of every final metric. With
    `references` (variant -> References of its task, on the `split` examples its runs were scored
    on): a column "<split> accuracy / ceiling" and rows for chance, the best shortcut and the
    ceiling of each distinct task (labelled with its variants when the variants' tasks differ)."""
    if not results:
        return "(no finished runs)"
    by_variant: dict[str, list[dict[str, float]]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(_flatten(r["final"]))
    columns: list[str] = list(SUMMARY_KEYS)
    for rows in by_variant.values():
        for row in rows:
            columns += [k for k in row if k not in columns]
    compared = f"{split} {METRIC}"
    refs = {v: references[v] for v in by_variant if references and references.get(v) and compared in columns}
    head = ["variant", "seeds", *(c.replace("_", " ") for c in columns)] + ([f"{compared} / ceiling"] if refs else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for variant, rows in by_variant.items():
        cells = []
        for c in columns:
            values = [row[c] for row in rows if c in row and not math.isnan(row[c])]
            cells.append(_fmt(c, *mean_std(values), len(values)) if values else "")
        if refs:
            values = [row[compared] for row in rows if compared in row]
            cells.append(f"{refs[variant].fraction(mean_std(values)[0]):.3f}" if variant in refs and values else "")
        lines.append(f"| {variant} | {len(rows)} | " + " | ".join(cells) + " |")
    groups: dict[int, list[str]] = {}  # variants sharing one References object share its rows
    for variant, r in refs.items():
        groups.setdefault(id(r), []).append(variant)
    for variants in groups.values():
        r = refs[variants[0]]
        label = "" if len(groups) == 1 else f" [{', '.join(variants)}]"
        values = r.row_values()
        for name, cells in r.rows().items():
            row = [cells.get(c.removeprefix(f"{split} "), "") if c.startswith(f"{split} ") else "" for c in columns]
            lines.append(f"| {name}{label} | | " + " | ".join(row) + f" | {r.fraction(values[name]):.3f} |")
    return "\n".join(lines)


def primary_metric(results: list[dict], metric: str | None) -> str:
    """The compared metric: `metric`, else the first non-loss metric of the validation records."""
    if metric:
        return metric
    for r in results:
        for name in r["final"].get("test", r["final"].get("validation", {})):
            if name != "loss":
                return name
    return "loss"


def plot(results: list[dict], path: str | Path, metric: str | None = None, title: str = "") -> Path:
    """One figure: validation curves of `metric` per variant (mean over seeds, min-max band) and the
    final test (else validation) value per variant (mean ± std over seeds)."""
    plt = pyplot()
    import numpy as np

    metric = primary_metric(results, metric)
    variants = list(dict.fromkeys(r["variant"] for r in results))
    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(11, 4))
    finals = []
    for i, variant in enumerate(variants):
        runs = [r for r in results if r["variant"] == variant]
        curves = [{p["step"]: p[metric] for p in r["curve"] if metric in p} for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            values = np.array([[c[s] for s in steps] for c in curves])
            color = f"C{i}"
            ax_curve.plot(steps, values.mean(0), "o-", ms=3, color=color, label=variant)
            if len(runs) > 1:
                ax_curve.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2)
        split = "test" if all("test" in r["final"] for r in runs) else "validation"
        vals = [r["final"][split][metric] for r in runs if metric in r["final"].get(split, {})]
        finals.append((variant, split, *mean_std(vals)) if vals else (variant, split, float("nan"), 0.0))
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel(f"validation {metric}")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend()
    x = np.arange(len(finals))
    ax_bar.bar(x, [f[2] for f in finals], yerr=[f[3] for f in finals], color=[f"C{i}" for i in range(len(finals))],
               capsize=4)
    ax_bar.set_xticks(x, [f[0] for f in finals])
    ax_bar.set_ylabel(f"final {finals[0][1] if finals else ''} {metric}")
    ax_bar.grid(alpha=0.3, axis="y")
    for xi, f in zip(x, finals):
        ax_bar.annotate(f"{f[2]:.3f}", (xi, f[2]), ha="center", va="bottom", fontsize=8)
    seeds = sorted({r["seed"] for r in results})
    fig.suptitle(f"{title + ': ' if title else ''}{metric}, mean over seeds {seeds} (band: min-max, bars: ± std)")
    return save_figure(fig, path)


def write_summary(out: str | Path, spec: SweepSpec, title: str = "", references: dict[str, References] | None = None,
                  split: str = "test") -> tuple[str, Path]:
    """Collect the finished runs, write sweep.md, results.json, references.json (when given) and
    comparison.png under `out`."""
    out = Path(out)
    results = collect(out, spec)
    md = table(results, references, split)
    captions = list(dict.fromkeys(r.caption() for r in (references or {}).values() if r))
    (out / "sweep.md").write_text((f"# {title}\n\n" if title else "") + md + "\n" +
                                  "".join(f"\n{c}\n" for c in captions))
    (out / "results.json").write_text(json.dumps([{k: r[k] for k in ("variant", "seed", "final")} for r in results],
                                                 indent=2) + "\n")
    if references:
        (out / "references.json").write_text(json.dumps({v: r.to_dict() if r else None for v, r in references.items()},
                                                        indent=2) + "\n")
    return md + "".join(f"\n{c}" for c in captions), plot(results, out / "comparison.png", spec.metric, title)


def run_parallel(jobs: list, workers: int, run: Callable[[int, Any], None]) -> float:
    """Call run(worker_index, job) for every job on `workers` threads that share one queue (each job
    is typically a training subprocess, so threads suffice). Returns the wall seconds."""
    pending: queue.Queue = queue.Queue()
    for job in jobs:
        pending.put(job)

    def loop(index: int) -> None:
        while True:
            try:
                job = pending.get_nowait()
            except queue.Empty:
                return
            run(index, job)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_logged(cmd: list[str], log: Path, threads: int, cwd: Path) -> bool:
    """Run cmd with `threads` torch threads, appending the command line and its output to `log`;
    whether it succeeded."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode == 0
