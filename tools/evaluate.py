"""Evaluate a trained run on a split and print a metrics table.

    python tools/evaluate.py runs/demo                        # test split, latest checkpoint
    python tools/evaluate.py runs/demo --split validation --max_examples 500
    python tools/evaluate.py runs/demo --gin_param "SymbolSoup.min_tokens = 2000" \\
        --gin_param "SymbolSoup.max_tokens = 2100"            # same model, longer sequences

The model and task are rebuilt from the run folder's config.gin; --gin_param bindings apply on top.
The table adds the task's chance, best shortcut and ceiling on the same examples, and each
accuracy as a fraction of the ceiling (zoo.tasks.reference; none for language modelling).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zoo import cli
from zoo.tasks.reference import references
from zoo.train.configurables import load_run
from zoo.train.evaluate import evaluate, metrics_table


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = cli.parser(__doc__)
    parser.add_argument("run_dir", type=Path, help="run folder written by tools/train.py")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder (default: the latest)")
    parser.add_argument("--max_examples", type=cli.positive_int, default=None, help="evaluate the first N examples (default: all)")
    parser.add_argument("--batch_size", type=cli.positive_int, default=None, help="default: the run's micro-batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gin_param", action="append", default=[], help="binding applied over the run's config.gin")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)

    model, task, config = load_run(args.run_dir, args.gin_param, args.checkpoint, device=args.device)
    batch_size = args.batch_size if args.batch_size is not None else max(1, config.batch_size // config.grad_accum)
    metrics = evaluate(model, task, args.split, batch_size=batch_size, max_examples=args.max_examples,
                       precision=config.precision)
    refs = references(task, args.split, args.max_examples)
    print(metrics_table({args.split: metrics}, refs))
    if refs:
        print(refs.caption())
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    cli.run(main)
