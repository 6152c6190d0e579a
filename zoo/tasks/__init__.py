"""Tasks generated on the fly from seeds (no downloads); the contract is in `zoo.tasks.base`.

    from zoo.tasks import get_task
    task = get_task("symbol_soup", min_tokens=400, max_tokens=600)
    loader = DataLoader(task.split("train"), batch_size=32, shuffle=True, collate_fn=task.collate)
    metrics = task.metrics("validation")
    for batch in loader: metrics.update(model(batch["tokens"]), batch)
    metrics.compute()  # {"accuracy": ...}

Chance, shortcut baselines and the ceiling of a task on the same examples:
`zoo.tasks.reference.references(task, "test", 1000)` (docs/tasks.md).
"""

from __future__ import annotations

from zoo.tasks.base import IGNORE_INDEX, SPLITS, Task, TaskSplit
from zoo.tasks.diffuse_mqar import DiffuseMQAR
from zoo.tasks.metrics import LagBucketAccuracy, TaskMetrics, TokenPerplexity
from zoo.tasks.mqar import MQAR
from zoo.tasks.symbol_soup import SymbolSoup, SymbolSoupTokenizer
from zoo.tasks.text_lm import TextLM

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (SymbolSoup, DiffuseMQAR, MQAR, TextLM)}


def get_task(name: str, **kwargs) -> Task:
    """Build the task registered as `name` from keyword arguments."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "TASKS",
    "DiffuseMQAR",
    "LagBucketAccuracy",
    "MQAR",
    "SymbolSoup",
    "SymbolSoupTokenizer",
    "Task",
    "TaskMetrics",
    "TaskSplit",
    "TextLM",
    "TokenPerplexity",
    "get_task",
]
