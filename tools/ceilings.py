"""Print a task's reference scores: chance, the shortcut baselines and the ceiling (the best
possible accuracy), each with its standard error, measured on generated examples.

    python tools/ceilings.py --task symbol_soup --lengths 200-300 400-600 600-800 2000-2100
    python tools/ceilings.py --task diffuse_mqar --front_distractors 0 1      # both layouts
    python tools/ceilings.py --task diffuse_mqar --set num_pairs=8 --set num_queries=4 --set "lag_range=(12, 96)"
    python tools/ceilings.py --task mqar
    python tools/ceilings.py --gin_file experiments/paper_comparison/symbol_soup.gin   # the task a config trains on

SymbolSoup: unigram, true-bigram and fitted-bigram classifiers and the exact Bayes-optimal one
(ceiling = its expected accuracy, the mean max posterior; "realised" = its accuracy on these
examples). Diffuse MQAR and MQAR: first / last prefix match, most recent key token, first
last-token match; the ceiling is 1 (whole-key recall, checked). One row per setting; --json
writes every number.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

import torch

from zoo import cli, gin_config
from zoo.tasks import TASKS, get_task
from zoo.tasks.reference import References, references


def parse_set(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set must be NAME=VALUE, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()


def parse_lengths(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit():
        raise argparse.ArgumentTypeError(f"--lengths takes MIN-MAX token ranges such as 400-600, got {text!r}")
    return int(lo), int(hi)


def table(rows: list[tuple[str, References, float]]) -> str:
    """One markdown row per setting: chance, every baseline, the ceiling (and the Bayes
    classifier's realised accuracy where there is one), seconds."""
    baselines = list(dict.fromkeys(b for _, refs, _ in rows for b in refs.baselines))
    extras = list(dict.fromkeys(e for _, refs, _ in rows for e in refs.extra))
    ceiling = rows[0][1].ceiling_name
    head = ["setting", "split", "examples", "chance", *baselines, f"ceiling ({ceiling})", *extras, "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, refs, seconds in rows:
        cells = [label, refs.split, str(refs.num_examples), f"{refs.chance:.3g}"]
        cells += [str(refs.baselines[b]["accuracy"]) if b in refs.baselines else "–" for b in baselines]
        cells += [str(refs.ceiling["accuracy"])] + [str(refs.extra[e]) if e in refs.extra else "–" for e in extras]
        lines.append("| " + " | ".join(cells + [f"{seconds:.0f}"]) + " |")
    return "\n".join(lines)


def lag_table(label: str, refs: References) -> str:
    """Diffuse MQAR: every baseline per lag bucket."""
    buckets = [k for k in refs.ceiling if k.startswith("accuracy_lag_")]
    if not buckets:
        return ""
    head = [label, *(b.removeprefix("accuracy_lag_").replace("_", "–") for b in buckets)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, scores in refs.baselines.items():
        lines.append(f"| {name} | " + " | ".join(str(scores[b]) if b in scores else "–" for b in buckets) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[tuple[str, References, float]]:
    parser = cli.parser(__doc__)
    parser.add_argument("--task", choices=sorted(TASKS), default=None, help="a task with its defaults (or --gin_file)")
    parser.add_argument("--set", type=parse_set, action="append", default=[], metavar="NAME=VALUE",
                        help="a constructor argument of --task (repeatable)")
    gin_config.add_gin_args(parser)
    parser.add_argument("--lengths", type=parse_lengths, nargs="+", default=None, metavar="MIN-MAX",
                        help="SymbolSoup token ranges, one row each")
    parser.add_argument("--front_distractors", type=cli.nonnegative_int, nargs="+", default=None,
                        help="Diffuse MQAR layouts, one row each (0: the paper's)")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--examples", type=cli.positive_int, default=2000, help="examples per setting (default 2000)")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if (args.task is None) == (not args.gin_file):
        parser.error("give either --task or --gin_file")
    if args.examples < 2:
        parser.error(f"--examples must be >= 2 (a standard error needs two); got {args.examples}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    torch.set_num_threads(args.threads)

    if args.gin_file:
        from zoo.train import configurables

        gin_config.parse(args.gin_file, args.gin_param, finalize=False)  # a model config may be left open
        base = configurables.configured_task()
        name, kwargs = base.name, None
    else:
        name, kwargs = args.task, dict(args.set)
    settings = [("", {})]
    if args.lengths:
        settings = [(f"{lo}-{hi} tokens", {"min_tokens": lo, "max_tokens": hi}) for lo, hi in args.lengths]
    elif args.front_distractors:
        settings = [("paper layout" if c == 0 else f"front_distractors={c}", {"front_distractors": c})
                    for c in args.front_distractors]

    rows = []
    for label, override in settings:
        if kwargs is None:  # from gin: rebind the overrides
            gin_config.parse(args.gin_file, [*args.gin_param, *(f"{type(base).__name__}.{k} = {v!r}" for k, v in override.items())],
                             finalize=False)
            task = configurables.configured_task()
        else:
            task = get_task(name, **{**kwargs, **override})
        start = time.perf_counter()
        refs = references(task, args.split, args.examples, progress=True)
        if refs is None:
            parser.error(f"{name} has no reference scores (only SymbolSoup, Diffuse MQAR and MQAR do)")
        rows.append((label or refs.task, refs, time.perf_counter() - start))
        print(f"{refs.task}: {rows[-1][2]:.0f} s", flush=True)
    print("\n" + table(rows))
    for label, refs, _ in rows:
        if lags := lag_table(label or refs.task, refs):
            print(f"\n{refs.task}, per lag bucket:\n\n{lags}")
    if args.json:
        args.json.write_text(json.dumps([{"setting": label, "seconds": s, **refs.to_dict()} for label, refs, s in rows],
                                        indent=2) + "\n")
    return rows


if __name__ == "__main__":
    cli.run(main)
