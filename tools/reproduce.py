"""Reproduce the paper's Table 1 at CPU scale, plus the hybrids and the no-feedback ablation.

    python tools/reproduce.py                                  # both tasks, 2 seeds, 2 worker processes
    python tools/reproduce.py --tasks diffuse_mqar --seeds 0 --only sessa attention
    python tools/reproduce.py --report_only                    # rebuild the table from finished runs

Six models in the paper's gated block, parameter-matched (configs/experiments/paper_comparison/):
Sessa, attention, Mamba-2 (the paper's comparison), Sessa/attention and Sessa/Mamba-2 interleaved,
and Sessa without its feedback branch, on SymbolSoup and Diffuse MQAR (the sweeps
experiments/paper_comparison/{symbol_soup,diffuse_mqar}_sweep.gin). Every (task, seed, model) is
one tools/sweep.py process (finished runs are skipped, so re-running completes an interrupted
reproduction), taken from a shared queue by --workers parallel workers with --threads torch
threads each. Then one markdown table per task (per-seed and mean test accuracy, its fraction of
the ceiling, the paper's numbers, parameters, tokens seen, wall time; chance, the best shortcut
and the ceiling of the task on the same test examples; Diffuse MQAR per lag bucket), one figure
and the numbers as data: <out>/reproduction.md, <out>/reproduction.png, <out>/reproduction.json
(the format of docs/results/reproduction.json, zoo.train.reproduction).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zoo import cli, gin_config  # noqa: E402
from zoo.plots import pyplot, save_figure  # noqa: E402
from zoo.tasks.reference import References, references  # noqa: E402
from zoo.train import configurables  # noqa: E402
from zoo.train.configurables import read_sweep  # noqa: E402
from zoo.train.reproduction import LAYOUTS, PAPER, TASK_NAMES, lag_table, model_entry, task_table  # noqa: E402
from zoo.train.sweep import SweepSpec, collect, run_logged, run_parallel, write_summary  # noqa: E402

SWEEPS = {"symbol_soup": "experiments/paper_comparison/symbol_soup_sweep.gin",
          "diffuse_mqar": "experiments/paper_comparison/diffuse_mqar_sweep.gin"}


def run_job(index: int, job: tuple[str, int, str], args: argparse.Namespace, failures: list[str]) -> None:
    """One (task, seed, model) job: a tools/sweep.py process (a finished run is skipped by the sweep),
    its output appended to this worker's log."""
    task, seed, variant = job
    log = args.out / "logs" / f"worker{index}.log"
    cmd = [sys.executable, str(ROOT / "tools" / "sweep.py"), "--sweep", SWEEPS[task], "--seeds", str(seed),
           "--only", variant, "--out", str(args.out / task)]
    for p in args.gin_param:
        cmd += ["--gin_param", p]
    if not run_logged(cmd, log, args.threads, ROOT):
        failures.append(f"{task} seed {seed} {variant} (see {log})")


def spec_of(task: str, args: argparse.Namespace) -> SweepSpec:
    spec = read_sweep(SWEEPS[task])
    spec.seeds = args.seeds
    if args.only:
        spec.variants = {k: v for k, v in spec.variants.items() if k in args.only}
    return spec


def task_references(spec: SweepSpec, args: argparse.Namespace) -> tuple[References | None, int]:
    """Chance, shortcuts and ceiling of the task the sweep trains on, on the test examples its runs
    are scored on (the first TrainConfig.final_eval_examples); and the sweep's step count."""
    gin_config.parse([*spec.gin_files, *next(iter(spec.variants.values()))], [*spec.gin_params, *args.gin_param])
    config = configurables.configured_train_config()
    return references(configurables.configured_task(), "test", config.final_eval_examples), config.steps


def report(args: argparse.Namespace, wall_s: float | None) -> tuple[str, Path]:
    """The markdown report, the figure and reproduction.json, from the finished runs under args.out."""
    entry = {"label": args.label, "command": " ".join(["python", "tools/reproduce.py", *args.argv]),
             "wall_time_s": wall_s, "tasks": {}}
    for task in args.tasks:
        spec = spec_of(task, args)
        refs, steps = task_references(spec, args)
        entry["label"] = entry["label"] or f"{steps} steps"
        write_summary(args.out / task, spec, f"{task} (CPU reproduction)", {v: refs for v in spec.variants})
        runs = collect(args.out / task, spec)
        models = {v: model_entry(v, sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"]))
                  for v in spec.variants if any(r["variant"] == v for r in runs)}
        entry["tasks"][task] = {"references": refs.to_dict() if refs else None, "models": models}
    md = ["# CPU reproduction of the paper's Table 1", ""]
    for task in args.tasks:
        refs = entry["tasks"][task]["references"]
        md += [f"{TASK_NAMES[task]}: test accuracy (the paper: its Table 1; of ceiling: mean / ceiling)", "",
               task_table(entry, task), ""]
        if refs:
            md += [References.from_dict(refs).caption(), ""]
        if task == "diffuse_mqar" and entry["tasks"][task]["models"]:
            md += ["Diffuse MQAR: test accuracy per lag bucket (mean over seeds; the first bucket holds the training lags)",
                   "", lag_table(entry, task), ""]
    if wall_s is not None:
        md.append(f"Total wall time: {wall_s / 60:.1f} min ({args.workers} workers x {args.threads} threads).")
    text = "\n".join(md) + "\n"
    (args.out / "reproduction.md").write_text(text)
    (args.out / "reproduction.json").write_text(json.dumps(entry, indent=2) + "\n")
    return text, plot(entry, args.out / "reproduction.png")


def plot(entry: dict, path: Path) -> Path:
    """Per task: test accuracy per model (bar: mean over seeds, dots: seeds, black x: the paper),
    with chance, the best shortcut and the ceiling of the task as horizontal lines."""
    plt = pyplot()

    tasks = entry["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, (task, data) in zip(axes[0], tasks.items()):
        names = list(data["models"])
        for i, variant in enumerate(names):
            accs = [s["accuracy"] for s in data["models"][variant]["seeds"].values()]
            ax.bar(i, sum(accs) / len(accs), color=f"C{i}", alpha=0.7)
            ax.plot([i] * len(accs), accs, "o", color="black", ms=3)
            if variant in PAPER[task]:
                ax.plot(i, PAPER[task][variant], "x", color="black", ms=8, mew=2)
        if data["references"]:
            refs = References.from_dict(data["references"])
            shortcut, best = refs.best_shortcut()
            for value, style, label in ((refs.chance, ":", "chance"), (best.value, "--", f"shortcut ({shortcut})"),
                                        (refs.ceiling["accuracy"].value, "-", f"ceiling ({refs.ceiling_name})")):
                ax.axhline(value, color="gray", ls=style, lw=1, label=label)
            ax.legend(fontsize=7, loc="upper right")
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
    parser.add_argument("--label", default=None, help="name of this budget in reproduction.json (default: '<steps> steps')")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only:
        unknown = sorted(set(args.only) - set(LAYOUTS))
        if unknown:
            parser.error(f"--only: unknown models {unknown}; valid: {sorted(LAYOUTS)}")

    wall = None
    if not args.report_only:
        # SymbolSoup (the longer sequences) first: the workers finish together
        jobs = [(task, seed, variant) for task in args.tasks for seed in args.seeds
                for variant in spec_of(task, args).variants]
        failures: list[str] = []
        wall = run_parallel(jobs, args.workers, lambda i, job: run_job(i, job, args, failures))
        if failures:
            raise SystemExit("failed: " + "; ".join(failures))
    text, figure = report(args, wall)
    print(text)
    print(f"report: {args.out / 'reproduction.md'}  figure: {figure}")
    return text


if __name__ == "__main__":
    cli.run(main)
