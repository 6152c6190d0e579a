"""Train a model on a task, everything configured by gin (t5x style).

    python tools/train.py --gin_file experiments/demo.gin --run_dir runs/demo
    python tools/train.py --gin_file train/tasks/symbol_soup.gin --gin_file hybrids/sessa_attention.gin \\
        --gin_file sizes/tiny.gin --gin_param "TrainConfig.steps = 300" --run_dir runs/soup
    python tools/train.py --run_dir runs/soup --resume          # continue from the latest checkpoint
    python tools/train.py --gin_file ... --run_dir runs/soup --set_aside   # keep the old run aside, start afresh
    torchrun --nproc_per_node 2 tools/train.py --gin_file ... --run_dir runs/ddp

--gin_file is repeatable (searched here, then in configs/), --gin_param bindings apply after the
files. With --resume and no --gin_file, the run folder's own config.gin is used. The run folder
holds config.gin, metrics.jsonl, final_metrics.json, checkpoints/ and plots/ (docs/training.md).
A folder that already holds a run is refused unless --resume continues it or --set_aside moves it
to <run_dir>.set-aside-<date>-<time> first. Resuming a finished run changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from zoo import cli, gin_config
from zoo.train import configurables, distributed
from zoo.train.evaluate import metrics_table
from zoo.train.loop import train
from zoo.train.run_dir import CONFIG


def default_run_dir(gin_files: list[str]) -> Path:
    return Path("runs") / (Path(gin_files[-1]).stem if gin_files else "run")


def main(argv: list[str] | None = None) -> dict:
    parser = cli.parser(__doc__)
    gin_config.add_gin_args(parser)
    parser.add_argument("--run_dir", type=Path, default=None,
                        help="run folder (default: runs/<stem of the last --gin_file>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("--set_aside", action="store_true",
                        help="if the run folder holds another run, move it to <run_dir>.set-aside-<date>-<time> first")
    args = parser.parse_args(argv)
    if args.resume and args.set_aside:
        parser.error("--resume continues the run in --run_dir and --set_aside moves it away: give one of them")

    run_dir = args.run_dir or default_run_dir(args.gin_file)
    gin_files = list(args.gin_file)
    if not gin_files:
        if not (args.resume and (run_dir / CONFIG).is_file()):
            parser.error("give at least one --gin_file (or --resume with a --run_dir that holds config.gin)")
        gin_files = [str(run_dir / CONFIG)]
    gin_config.parse(gin_files, args.gin_param)
    config = configurables.configured_train_config()
    task = configurables.configured_task()
    try:
        final = train(config, gin_config.build_model, task, run_dir, resume=args.resume, set_aside=args.set_aside,
                      operative_config=gin_config.operative_config)
        distributed.barrier()  # no rank closes its gloo connections while another still uses them
    finally:
        distributed.teardown()
    if os.environ.get("RANK", "0") == "0":
        print(metrics_table({split: final[split] for split in config.final_splits}))
        speed = f"{final['tokens_per_s']:,.0f}" if final.get("tokens_per_s") else "-"
        print(f"parameters {final['parameters']:,}  tokens/s {speed}  "
              f"wall time {final['wall_time_s']:.1f} s  run folder {run_dir}")
    return final


if __name__ == "__main__":
    cli.run(main)
