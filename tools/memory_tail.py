"""Memory-tail probe: how the influence of the input at tau on the output at tau + l decays with l.

    # randomly initialised models, one per layout, compared in one figure
    python tools/memory_tail.py --gin_file probes/random_init.gin --layout S --layout A --layout M --layout SMSA
    # the paper's explicit construction (uniform routing, constant gain): slope -(1 - GAIN)
    python tools/memory_tail.py --gin_file probes/uniform_routing.gin --gin_param "GAIN = 0.9" \\
        --seq_len 4100 --sources 0 --fit_range 100 4000 --no_jacobian
    # trained runs (folders written by tools/train.py), on their own validation inputs
    python tools/memory_tail.py --run runs/soup_sessa --run runs/soup_attention --seq_len 256

Each model gives the end-to-end Jacobian curve and, per Sessa layer, the fixed-routing kernel with
its routing statistics (zoo/probes/memory_tail.py, docs/memory_tail.md). Writes <out>/memory_tail.md
(the table), <out>/memory_tail.json (every curve) and <out>/memory_tail.png (log-log, fitted lines).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from zoo import cli, gin_config
from zoo.probes.memory_tail import ProbeResult, format_table, plot, probe, random_inputs, task_inputs


def probe_gin_models(args: argparse.Namespace) -> list[ProbeResult]:
    """One randomly initialised (or constructed) model per --layout (or one from the config as is)."""
    results = []
    layouts = args.layout or [None]
    for layout in layouts:
        params = list(args.gin_param) + ([f"LAYOUT = '{layout}'"] if layout else [])
        gin_config.parse(args.gin_file, params)
        torch.manual_seed(args.seed)
        model = gin_config.build_model()
        label = layout or Path(args.gin_file[-1]).stem
        inputs = random_inputs(model, args.batch_size, args.seq_len, torch.Generator().manual_seed(args.seed))
        results.append(run_probe(model, inputs, label, args))
    return results


def probe_runs(args: argparse.Namespace) -> list[ProbeResult]:
    """One trained model per --run folder, probed on the first validation examples of its task
    (labelled by the folder's path below the runs' common parent, or its name)."""
    from zoo.train.configurables import load_run

    results = []
    runs = [Path(run).resolve() for run in args.run]
    common = Path(os.path.commonpath(runs)) if len(runs) > 1 else None
    for run in runs:
        model, task, _ = load_run(run, args.gin_param)
        inputs = task_inputs(task, args.batch_size, args.seq_len)
        label = run.relative_to(common).as_posix() if common is not None and run != common else run.name
        results.append(run_probe(model, inputs, label, args))
    return results


def run_probe(model: torch.nn.Module, inputs: torch.Tensor, label: str, args: argparse.Namespace) -> ProbeResult:
    t0 = time.perf_counter()
    result = probe(model, inputs, label=label, sources=args.sources, fit_range=args.fit_range,
                   directions=None if args.exact else args.directions, jacobian=not args.no_jacobian,
                   dtype=torch.float32 if args.float32 else torch.float64,
                   generator=torch.Generator().manual_seed(args.seed))
    print(f"{label}: T={result.seq_len}, {len(result.curves)} curve(s) in {time.perf_counter() - t0:.1f} s")
    return result


def main(argv: list[str] | None = None) -> list[ProbeResult]:
    parser = cli.parser(__doc__)
    gin_config.add_gin_args(parser)
    parser.add_argument("--layout", action="append", default=[],
                        help="probe a model built from the gin config with LAYOUT = this pattern (repeatable)")
    parser.add_argument("--run", action="append", default=[], help="a trained run folder to probe (repeatable)")
    parser.add_argument("--seq_len", type=cli.positive_int, default=None,
                        help="sequence length T (default 512 for gin models; a run: its shortest example)")
    parser.add_argument("--batch_size", type=cli.positive_int, default=2, help="inputs averaged over (default 2)")
    parser.add_argument("--sources", type=cli.nonnegative_int, nargs="+", default=[0, 1, 2, 3],
                        help="source positions tau averaged over (default 0 1 2 3)")
    parser.add_argument("--directions", type=cli.positive_int, default=16,
                        help="Gaussian tangents per input and source: an unbiased estimate of the squared "
                             "norm (default 16)")
    parser.add_argument("--exact", action="store_true",
                        help="push all D unit tangents instead (the exact Frobenius norm; D/16 times the cost)")
    parser.add_argument("--fit_range", type=cli.nonnegative_int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="lags of the fits (default: L/16 .. L-1)")
    parser.add_argument("--no_jacobian", action="store_true", help="Sessa kernels only (cheap at long T)")
    parser.add_argument("--float32", action="store_true", help="probe in float32 (default float64)")
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seeds the initialisation and the inputs")
    parser.add_argument("--out", type=Path, default=Path("runs/memory_tail"), help="output folder")
    args = parser.parse_args(argv)
    if not args.gin_file and not args.run:
        parser.error("give --gin_file (a model config, e.g. probes/random_init.gin) and/or --run")
    if args.layout and not args.gin_file:
        parser.error("--layout needs a --gin_file to build the models from")

    results = []
    if args.gin_file:
        seq_len, args.seq_len = args.seq_len, args.seq_len or 512
        results += probe_gin_models(args)
        args.seq_len = seq_len
    results += probe_runs(args)

    table = format_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = (f"sources {args.sources}, inputs {args.batch_size}, "
                f"tangents {'all D (exact)' if args.exact else f'{args.directions} Gaussian'}, "
                f"{'float32' if args.float32 else 'float64'}, seed {args.seed}")
    (args.out / "memory_tail.md").write_text(f"# Memory tail\n\n{settings}\n\n{table}\n")
    (args.out / "memory_tail.json").write_text(json.dumps([r.to_json() for r in results]) + "\n")
    figure = plot(results, args.out / "memory_tail.png")
    print(table)
    print(f"table: {args.out / 'memory_tail.md'}  curves: {args.out / 'memory_tail.json'}  figure: {figure}")
    return results


if __name__ == "__main__":
    cli.run(main)
