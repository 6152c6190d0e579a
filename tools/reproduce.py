"""Reproduce the paper's Table 1 at CPU scale, plus the hybrids and the no-feedback ablation.

    python tools/reproduce.py                                  # both tasks, 2 seeds, 2 worker processes
    python tools/reproduce.py --tasks diffuse_mqar --seeds 0 --only sessa attention
    python tools/reproduce.py --report_only                    # rebuild the table from finished runs

Six models in the paper's gated block, parameter-matched (configs/reproduction/): Sessa, attention,
Mamba-2 (the paper's comparison), Sessa/attention and Sessa/Mamba-2 interleaved, and Sessa without its
feedback branch, on SymbolSoup and Diffuse MQAR (the sweeps configs/reproduction/{symbol_soup,
diffuse_mqar}.gin). Every (task, seed, model) is one tools/sweep.py process (finished runs are
skipped, so re-running completes an interrupted reproduction), taken from a shared queue by
--workers parallel workers with --threads torch threads each. Then one markdown table per task
(per-seed and mean test accuracy, the paper's numbers, parameters, tokens seen, wall time; Diffuse
MQAR per lag bucket) and one figure: <out>/reproduction.md and <out>/reproduction.png.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zoo import cli  # noqa: E402
from zoo.train.configurables import read_sweep  # noqa: E402
from zoo.train.sweep import SweepSpec, collect, mean_std, write_summary  # noqa: E402
from zoo.plots import pyplot, save_figure

SWEEPS = {"symbol_soup": "reproduction/symbol_soup.gin", "diffuse_mqar": "reproduction/diffuse_mqar.gin"}
TASK_NAMES = {"symbol_soup": "SymbolSoup", "diffuse_mqar": "Diffuse MQAR"}
# The paper's Table 1 (test accuracy; two seeds; model sizes not stated); absent: not reported.
PAPER = {"symbol_soup": {"sessa": 0.860, "attention": 0.792, "mamba2": 0.050},
         "diffuse_mqar": {"sessa": 0.154, "attention": 0.122, "mamba2": 0.002}}
LAYOUTS = {"sessa": "S", "attention": "A", "mamba2": "M", "sessa_attention": "SA", "sessa_mamba2": "SM",
           "sessa_nofb": "N"}


def worker(index: int, jobs: queue.Queue, args: argparse.Namespace, failures: list[str]) -> None:
    """Take (task, seed, model) jobs from the shared queue until it is empty; each job is one
    tools/sweep.py process (a finished run is skipped by the sweep)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    log = args.out / "logs" / f"worker{index}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        while True:
            try:
                task, seed, variant = jobs.get_nowait()
            except queue.Empty:
                return
            cmd = [sys.executable, str(ROOT / "tools" / "sweep.py"), "--sweep", SWEEPS[task], "--seeds", str(seed),
                   "--only", variant, "--out", str(args.out / task)]
            for p in args.gin_param:
                cmd += ["--gin_param", p]
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode:
                failures.append(f"{task} seed {seed} {variant} (see {log})")


def spec_of(task: str, args: argparse.Namespace) -> SweepSpec:
    spec = read_sweep(SWEEPS[task])
    spec.seeds = args.seeds
    if args.only:
        spec.variants = {k: v for k, v in spec.variants.items() if k in args.only}
    return spec


def _acc(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3f}"


def report(args: argparse.Namespace, wall_s: float | None) -> tuple[str, Path]:
    """The markdown report and the figure, from the finished runs under args.out."""
    results = {}
    for task in args.tasks:
        spec = spec_of(task, args)
        write_summary(args.out / task, spec, f"{task} (CPU reproduction)")  # per-task table and curves
        results[task] = {variant: sorted((r for r in collect(args.out / task, spec) if r["variant"] == variant),
                                         key=lambda r: r["seed"]) for variant in spec.variants}
    md = ["# CPU reproduction of the paper's Table 1", ""]
    for task in args.tasks:
        md += [f"{TASK_NAMES[task]}: test accuracy (the paper: its Table 1)", "",
               "| model | layout | per seed | mean ± std | paper | parameters | tokens seen / run | wall time / run |",
               "|---|---|---|---|---|---|---|---|"]
        for variant, runs in results[task].items():
            accs = [r["final"]["test"]["accuracy"] for r in runs]
            m, s = mean_std(accs) if accs else (float("nan"), 0.0)
            tokens = [r["final"]["tokens_per_s"] * r["final"]["train_time_s"] for r in runs]
            walls = [r["final"]["wall_time_s"] for r in runs]
            per_seed = ", ".join(f"{a:.3f} (s{r['seed']})" for a, r in zip(accs, runs)) or "–"
            spread = f" ± {s:.3f}" if len(accs) > 1 else ""
            params = f"{runs[0]['final']['parameters']:,}" if runs else "–"
            seen = f"{sum(tokens) / len(tokens) / 1e6:.2f}M" if tokens else "–"
            minutes = f"{sum(walls) / len(walls) / 60:.1f} min" if walls else "–"
            md.append(f"| {variant} | {LAYOUTS.get(variant, '?')} | {per_seed} | {_acc(m)}{spread} | "
                      f"{_acc(PAPER[task].get(variant))} | {params} | {seen} | {minutes} |")
        md.append("")

    if "diffuse_mqar" in results:
        buckets = list(dict.fromkeys(k for runs in results["diffuse_mqar"].values() for r in runs
                                     for k in r["final"]["test"] if k.startswith("accuracy_lag_")))
        if buckets:
            md += ["Diffuse MQAR: test accuracy per lag bucket (mean over seeds; the first bucket holds the training lags)",
                   "",
                   "| model | " + " | ".join(b.removeprefix("accuracy_lag_").replace("_", "–") for b in buckets) + " |",
                   "|---" * (len(buckets) + 1) + "|"]
            for variant, runs in results["diffuse_mqar"].items():
                cells = [_acc(mean_std([r["final"]["test"][b] for r in runs if b in r["final"]["test"]])[0])
                         if any(b in r["final"]["test"] for r in runs) else "–" for b in buckets]
                md.append(f"| {variant} | " + " | ".join(cells) + " |")
            md.append("")
    if wall_s is not None:
        md.append(f"Total wall time: {wall_s / 60:.1f} min ({args.workers} workers x {args.threads} threads).")
    text = "\n".join(md) + "\n"
    (args.out / "reproduction.md").write_text(text)
    return text, plot(results, args.out / "reproduction.png")


def plot(results: dict[str, dict[str, list[dict]]], path: Path) -> Path:
    """Per task: test accuracy per model (bar: mean over seeds, dots: seeds, black x: the paper)."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (task, by_variant) in zip(axes[0], results.items()):
        names = list(by_variant)
        for i, variant in enumerate(names):
            accs = [r["final"]["test"]["accuracy"] for r in by_variant[variant]]
            if accs:
                ax.bar(i, sum(accs) / len(accs), color=f"C{i}", alpha=0.7)
                ax.plot([i] * len(accs), accs, "o", color="black", ms=3)
            if variant in PAPER[task]:
                ax.plot(i, PAPER[task][variant], "x", color="black", ms=8, mew=2)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{TASK_NAMES[task]} (bars: ours, mean of seeds; x: paper)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path, dpi=80)


def main(argv: list[str] | None = None) -> str:
    parser = cli.parser(__doc__)
    parser.add_argument("--tasks", nargs="+", choices=sorted(SWEEPS), default=list(SWEEPS))
    parser.add_argument("--seeds", type=cli.nonnegative_int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", default=None, help="run only these models (default: all six)")
    parser.add_argument("--gin_param", action="append", default=[], help="binding for every run (repeatable)")
    parser.add_argument("--workers", type=cli.positive_int, default=2, help="parallel worker processes (default 2)")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduction"), help="output folder")
    parser.add_argument("--report_only", action="store_true", help="only rebuild the report from finished runs")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only:
        unknown = sorted(set(args.only) - set(LAYOUTS))
        if unknown:
            parser.error(f"--only: unknown models {unknown}; valid: {sorted(LAYOUTS)}")

    wall = None
    if not args.report_only:
        jobs: queue.Queue = queue.Queue()
        for task in args.tasks:  # SymbolSoup (the longer sequences) first: the workers finish together
            for seed in args.seeds:
                for variant in spec_of(task, args).variants:
                    jobs.put((task, seed, variant))
        failures: list[str] = []
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i, jobs, args, failures)) for i in range(args.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if failures:
            raise SystemExit("failed: " + "; ".join(failures))
    text, figure = report(args, wall)
    print(text)
    print(f"report: {args.out / 'reproduction.md'}  figure: {figure}")
    return text


if __name__ == "__main__":
    cli.run(main)
