"""gin wiring for training, through zoo.gin_config (the zoo's one gin module).

Importing this module makes configurable: every task in zoo.tasks.TASKS under its class name
(SymbolSoup, DiffuseMQAR, MQAR, TextLM), TrainConfig, adamw, cosine_schedule, build_task
and SweepSpec (sweep files, tools/sweep.py).

    build_task.task = @SymbolSoup          # configs/train/tasks/*.gin
    SymbolSoup.max_tokens = 600
    TrainConfig.steps = 2000
    adamw.lr = 1e-3
    cosine_schedule.warmup_steps = 100
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from zoo import gin_config
from zoo.tasks import TASKS, Task
from zoo.train import checkpoint
from zoo.train.loop import TrainConfig
from zoo.train.optim import adamw, cosine_schedule
from zoo.train.run_dir import CONFIG
from zoo.train.sweep import SweepSpec


def build_task(task: Callable[[], Task] | None = None) -> Task:
    """Build the task a config names: `build_task.task = @SymbolSoup` (configs/train/tasks/*.gin)."""
    if task is None:
        raise ValueError("no task configured: bind `build_task.task = @SymbolSoup` (or @DiffuseMQAR, @MQAR, @TextLM), "
                         "e.g. --gin_file train/tasks/symbol_soup.gin")
    return task()


for _factory in (*TASKS.values(), TrainConfig, adamw, cosine_schedule, build_task, SweepSpec):
    gin_config.configurable(_factory)


def configured_task() -> Task:
    """The task of the parsed gin config."""
    return gin_config.configurable(build_task)()


def configured_train_config() -> TrainConfig:
    """The TrainConfig of the parsed gin config. The default optimizer and schedule are the
    configurable adamw / cosine_schedule, so `adamw.lr = ...` applies without naming @adamw."""
    config = gin_config.configurable(TrainConfig)()
    if config.optimizer is adamw:
        config.optimizer = gin_config.configurable(adamw)
    if config.schedule is cosine_schedule:
        config.schedule = gin_config.configurable(cosine_schedule)
    return config


def load_run(run_dir: str | Path, gin_params: Sequence[str] = (), checkpoint_path: str | Path | None = None,
             device: str | torch.device = "cpu") -> tuple[nn.Module, Task, TrainConfig]:
    """Rebuild a finished (or checkpointed) run from its config.gin (plus `gin_params` overrides,
    e.g. a longer SymbolSoup) and load its latest checkpoint (or `checkpoint_path`).
    Returns (model in eval mode, task, train config).

    config.gin is a gin file, and gin files can `import` Python modules (running their code): load
    only run folders you trust. The checkpoint files themselves are loaded without running code."""
    run_dir = Path(run_dir)
    config_file = run_dir / CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a run folder written by tools/train.py?")
    gin_config.parse([str(config_file)], list(gin_params))
    config = configured_train_config()
    task = configured_task()
    model = gin_config.build_model().to(device)
    checkpoint.load_model_weights(model, checkpoint.resolve(checkpoint_path or run_dir))
    return model.eval(), task, config


def read_sweep(path: str | Path) -> SweepSpec:
    """The SweepSpec a sweep file binds (`SweepSpec.variants = {...}`, `SweepSpec.seeds = [...]`)."""
    gin_config.parse([str(path)])
    return gin_config.configurable(SweepSpec)()
