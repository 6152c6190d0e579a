"""Recall across the zoo: MQAR accuracy against model width and decoding-state size (zoology's
headline experiment, arXiv 2312.04927, at CPU scale), for every mixer and two Sessa hybrids.

    python tools/recall.py                                   # the whole sweep, 2 worker processes
    python tools/recall.py --seeds 0 --only attention-d64 gla-d64
    python tools/recall.py --report_only                     # rebuild the report from finished runs

The sweep is configs/experiments/recall/mqar_sweep.gin (one variant per model and width); every
(variant, seed) is one `tools/sweep.py --only VARIANT --seeds SEED` process, taken from a shared
queue by --workers workers with --threads torch threads each (a progress bar counts finished
runs; each run's own bar and log go to <out>/logs/). Finished runs are skipped, so re-running
completes an interrupted sweep. Then: <out>/sweep.md and results.json (tools/sweep.py's table),
<out>/recall.json (the format of docs/results/recall.json, zoo.train.recall: accuracy per seed,
decoding state per layer from zoo.cache, the task's chance, best shortcut and ceiling),
<out>/recall.md and <out>/recall.png (accuracy against state per layer and against width).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from zoo import cli, gin_config  # noqa: E402
from zoo.registry import REGISTRY  # noqa: E402
from zoo.tasks.reference import describe, references  # noqa: E402
from zoo.train import configurables  # noqa: E402
from zoo.train.recall import plot, state_numbers, table, width_entry  # noqa: E402
from zoo.train.sweep import collect, run_logged, run_parallel, write_summary  # noqa: E402

SWEEP = "experiments/recall/mqar_sweep.gin"


def run_job(index: int, job: tuple[str, int], args: argparse.Namespace, failures: list[str], bar: tqdm) -> None:
    """One (variant, seed) job: a tools/sweep.py process, its output appended to this worker's log."""
    variant, seed = job
    log = args.out / "logs" / f"worker{index}.log"
    cmd = [sys.executable, str(ROOT / "tools" / "sweep.py"), "--sweep", SWEEP, "--only", variant,
           "--seeds", str(seed), "--out", str(args.out)]
    for p in args.gin_param:
        cmd += ["--gin_param", p]
    if not run_logged(cmd, log, args.threads, ROOT):
        failures.append(f"{variant} seed {seed} (see {log})")
    bar.update(1)
    bar.set_postfix_str(f"last: {variant} seed {seed}")


def model_and_width(variant: str) -> tuple[str, int]:
    """'gla-d64' -> ('gla', 64): the sweep's variants are named <model>-d<width> (the report takes
    the width from the built model, which a --gin_param may change)."""
    name, sep, width = variant.rpartition("-d")
    if not sep or not width.isdigit():
        raise ValueError(f"recall sweep variants are named <model>-d<width>; got {variant!r}")
    return name, int(width)


def compact(layout: str) -> str:
    """'KAKA' -> 'KA': the shortest pattern the layout tiles."""
    for n in range(1, len(layout) + 1):
        if len(layout) % n == 0 and layout[:n] * (len(layout) // n) == layout:
            return layout[:n]
    return layout


def report(args: argparse.Namespace, spec, wall_s: float | None) -> tuple[str, Path]:
    """recall.json, recall.md and recall.png under args.out, from the finished runs."""
    runs = collect(args.out, spec)
    first = next(iter(spec.variants.values()))
    gin_config.parse([*spec.gin_files, *first, *args.gin_file], [*spec.gin_params, *args.gin_param])
    config, task = configurables.configured_train_config(), configurables.configured_task()
    refs = references(task, config.final_splits[-1], config.final_eval_examples)
    write_summary(args.out, spec, "recall", {v: refs for v in spec.variants}, config.final_splits[-1])
    entry = {"command": " ".join(["python", "tools/recall.py", *args.argv]), "wall_time_s": wall_s,
             "workers": args.workers, "threads": args.threads, "seq_len": task.seq_len, "task": describe(task),
             "references": refs.to_dict() if refs else None, "models": {}}
    for variant, files in spec.variants.items():
        done = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        if not done:
            continue
        gin_config.parse([*spec.gin_files, *files, *args.gin_file], [*spec.gin_params, *args.gin_param])
        model = gin_config.build_model()
        name, width = model_and_width(variant)[0], model.dim
        layout = "".join(REGISTRY.mixer(n).symbol or "?" for n in model.stack.mixer_names)
        m = entry["models"].setdefault(name, {"name": name, "layout": compact(layout), "widths": {}})
        m["widths"][str(width)] = width_entry(done, state_numbers(model, task.seq_len))
    text = table(entry)
    (args.out / "recall.md").write_text(f"# Recall across the zoo\n\n{entry['task']}\n\n{text}\n")
    (args.out / "recall.json").write_text(json.dumps(entry, indent=2) + "\n")
    return text, plot(entry, args.out / "recall.png")


def main(argv: list[str] | None = None) -> str:
    parser = cli.parser(__doc__)
    gin_config.add_gin_args(parser)
    parser.add_argument("--seeds", type=cli.nonnegative_int, nargs="+", default=None,
                        help="seeds (default: the sweep file's)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants (model-dWIDTH)")
    parser.add_argument("--workers", type=cli.positive_int, default=2, help="parallel worker processes (default 2)")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/recall"), help="output folder")
    parser.add_argument("--report_only", action="store_true", help="only rebuild the report from finished runs")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    spec = configurables.read_sweep(SWEEP)
    if args.seeds is not None:
        spec.seeds = args.seeds
    if args.only:
        unknown = sorted(set(args.only) - set(spec.variants))
        if unknown:
            parser.error(f"--only: unknown variants {unknown}; valid: {sorted(spec.variants)}")
        spec.variants = {k: v for k, v in spec.variants.items() if k in args.only}
    if args.gin_file:
        spec.gin_files = spec.gin_files + args.gin_file
        args.gin_file = []

    wall = None
    if not args.report_only:
        jobs = [(variant, seed) for seed in spec.seeds for variant in spec.variants]
        failures: list[str] = []
        with tqdm(total=len(jobs), desc="recall sweep", unit="run") as bar:
            wall = run_parallel(jobs, args.workers, lambda i, job: run_job(i, job, args, failures, bar))
        if failures:
            raise SystemExit("failed: " + "; ".join(failures))
    text, figure = report(args, spec, wall)
    print(text)
    print(f"report: {args.out / 'recall.md'}  data: {args.out / 'recall.json'}  figure: {figure}")
    return text


if __name__ == "__main__":
    cli.run(main)
