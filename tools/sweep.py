"""Run a sweep: variants (gin files) x seeds, one after another, then one markdown table and one plot.

    # the paper's comparison (six models in the same gated block, parameter-matched)
    python tools/sweep.py --sweep experiments/paper_comparison/symbol_soup_sweep.gin
    python tools/sweep.py --sweep experiments/paper_comparison/symbol_soup_sweep.gin --only sessa attention mamba2 \\
        --gin_file experiments/paper_comparison/large.gin --out runs/sweeps/symbol_soup_large --seeds 0 1 2
    # ad hoc: any overlays on a shared base
    python tools/sweep.py --base train/tasks/symbol_soup.gin --base sizes/tiny.gin \\
        --variant sessa=mixers/sessa.gin --variant hybrid=hybrids/sessa_attention.gin --seeds 0 1

File order of each run: the base files (the sweep file's SweepSpec.gin_files, then --base), the
variant's files, then --gin_file; then SweepSpec.gin_params, --gin_param and
`TrainConfig.seed = <seed>`. Runs go to <out>/<variant>/seed<k>/; finished runs are skipped and
interrupted ones resumed, so re-running a sweep completes it. Writes <out>/sweep.md,
<out>/results.json, <out>/references.json and <out>/comparison.png. The table adds each task's
chance, best shortcut and ceiling, measured on the test examples the runs were scored on
(zoo.tasks.reference), and each test accuracy as a fraction of the ceiling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zoo import cli, gin_config
from zoo.train import checkpoint, configurables
from zoo.train.loop import train
from zoo.tasks.reference import References, describe, references
from zoo.train.sweep import SweepSpec, run_folder, write_summary


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, files = text.partition("=")
    if not sep or not name or not files:
        raise argparse.ArgumentTypeError(f"--variant must be NAME=FILE[,FILE...], got {text!r}")
    return name, files.split(",")


def sweep_references(spec: SweepSpec, args: argparse.Namespace) -> tuple[dict[str, References | None], str]:
    """variant -> the references of its task on the examples its final evaluation scored (the last
    of TrainConfig.final_splits, up to final_eval_examples); variants with the same task share one."""
    found: dict[tuple, References | None] = {}
    out, split = {}, "test"
    for variant, files in spec.variants.items():
        gin_config.parse([*spec.gin_files, *files, *args.gin_file], [*spec.gin_params, *args.gin_param])
        config, task = configurables.configured_train_config(), configurables.configured_task()
        split = config.final_splits[-1]
        n = config.final_eval_examples
        key = (describe(task), split, n)
        if key not in found:
            found[key] = references(task, split, n)
        out[variant] = found[key]
    return out, split


def main(argv: list[str] | None = None) -> str:
    parser = cli.parser(__doc__)
    parser.add_argument("--sweep", default=None, help="sweep file binding SweepSpec.variants / seeds / ...")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=FILE[,FILE]",
                        help="a variant (repeatable; added to the sweep file's)")
    parser.add_argument("--base", action="append", default=[], help="gin file before every variant (repeatable)")
    gin_config.add_gin_args(parser)
    parser.add_argument("--seeds", type=cli.nonnegative_int, nargs="+", default=None, help="seeds (default: the sweep file's, or 0)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants")
    parser.add_argument("--out", type=Path, default=None, help="sweep folder (default: runs/sweeps/<sweep file stem>)")
    args = parser.parse_args(argv)

    spec = configurables.read_sweep(args.sweep) if args.sweep else SweepSpec(variants=dict(args.variant))
    if args.sweep:
        spec.variants.update(dict(args.variant))
    if args.seeds is not None:
        spec.seeds = args.seeds
    spec.gin_files = spec.gin_files + args.base
    if args.only:
        unknown = sorted(set(args.only) - set(spec.variants))
        if unknown:
            parser.error(f"--only: unknown variants {unknown}; the sweep has {sorted(spec.variants)}")
        spec.variants = {k: v for k, v in spec.variants.items() if k in args.only}
    out = args.out or Path("runs") / "sweeps" / (Path(args.sweep).stem if args.sweep else "sweep")
    title = f"{Path(args.sweep).stem if args.sweep else 'sweep'}"

    runs = [(variant, files, seed) for variant, files in spec.variants.items() for seed in spec.seeds]
    for i, (variant, files, seed) in enumerate(runs):
        folder = run_folder(out, variant, seed)
        if (folder / "final_metrics.json").exists():
            print(f"[{i + 1}/{len(runs)}] {variant} seed {seed}: done already ({folder})")
            continue
        print(f"[{i + 1}/{len(runs)}] {variant} seed {seed} -> {folder}")
        gin_config.parse([*spec.gin_files, *files, *args.gin_file],
                         [*spec.gin_params, *args.gin_param, f"TrainConfig.seed = {seed}"])
        config = configurables.configured_train_config()
        task = configurables.configured_task()
        resume = checkpoint.latest(folder / "checkpoints") is not None  # else a run killed early is set aside
        train(config, gin_config.build_model, task, folder, resume=resume, set_aside=not resume,
              operative_config=gin_config.operative_config)

    refs, split = sweep_references(spec, args)
    table, plot = write_summary(out, spec, title, refs, split)
    print(table)
    print(f"table: {out / 'sweep.md'}  plot: {plot}")
    return table


if __name__ == "__main__":
    cli.run(main)
