"""make demo: train the default hybrid (Sessa interleaved with attention, tiny size) on SymbolSoup,
then print the metrics table (with chance, the best shortcut baseline and the Bayes-optimal ceiling
of SymbolSoup at the demo's lengths) and where the plots are. Chance is 1/20 = 0.05.

    python tools/demo.py                                  # configs/experiments/demo.gin
    python tools/demo.py --gin_param "TrainConfig.steps = 300"      # a quicker, weaker run
    python tools/demo.py --run_dir runs/my_demo --threads 2

The run folder (default runs/demo-<date>-<time>) holds config.gin, metrics.jsonl,
final_metrics.json, checkpoints/ and plots/; evaluate it again with tools/evaluate.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from zoo import cli, gin_config
from zoo.summary import summarize
from zoo.tasks.reference import references
from zoo.train import configurables
from zoo.train.evaluate import metrics_table
from zoo.train.loop import train

def main(argv: list[str] | None = None) -> dict:
    parser = cli.parser(__doc__)
    gin_config.add_gin_args(parser)
    parser.add_argument("--run_dir", type=Path, default=None, help="default: runs/demo-<date>-<time>")
    parser.add_argument("--threads", type=cli.positive_int, default=1,
                        help="torch CPU threads (default 1: this tiny model gains little from more, and when the "
                             "cores are shared, extra OpenMP threads can slow every step down many times over)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    run_dir = args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    gin_config.parse_args(args, default_files=["experiments/demo.gin"])
    config = configurables.configured_train_config()
    task = configurables.configured_task()
    torch.manual_seed(config.seed)
    print(summarize(gin_config.build_model()))
    print(f"\ntask: {task!r}, {task.min_tokens}-{task.max_tokens} tokens, {task.num_classes} classes "
          f"(chance {1 / task.num_classes:.2f}); {config.steps} steps of {config.batch_size} examples, "
          f"{torch.get_num_threads()} CPU threads\n")

    start = time.perf_counter()
    final = train(config, gin_config.build_model, task, run_dir, operative_config=gin_config.operative_config)
    minutes = (time.perf_counter() - start) / 60

    last = config.final_splits[-1]
    refs = references(task, last, config.final_eval_examples)  # on the examples the run was scored on
    print("\n" + metrics_table({split: final[split] for split in config.final_splits}, refs))
    accuracy = final[last].get("accuracy")
    if refs and accuracy is not None:
        shortcut, best = refs.best_shortcut()
        print(f"{refs.caption()}\n\n{last} accuracy {accuracy:.3f} = {accuracy / refs.chance:.1f}x chance "
              f"({refs.chance:.2f}) = {refs.fraction(accuracy):.2f} of the ceiling ({refs.ceiling['accuracy']}, "
              f"{refs.ceiling_name}); best shortcut baseline: {shortcut} {best}")
    print(f"{final['parameters']:,} parameters, {final['tokens_per_s']:,.0f} tokens/s, {minutes:.1f} minutes")
    print(f"plots:      {run_dir / 'plots' / 'loss.png'}  {run_dir / 'plots' / 'metrics.png'}")
    print(f"run folder: {run_dir}   (python tools/evaluate.py {run_dir} --split test)")
    return final


if __name__ == "__main__":
    cli.run(main)
