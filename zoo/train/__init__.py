"""Training, evaluation, checkpoints, run folders, distributed data parallelism and sweeps.

    from zoo.train import TrainConfig, train, evaluate
    result = train(TrainConfig(steps=200), build_model, task, "runs/mine")

The gin wiring (what `--gin_file` configures) is in zoo.train.configurables; see docs/training.md.
"""

from zoo.train.evaluate import evaluate
from zoo.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "evaluate", "train"]
