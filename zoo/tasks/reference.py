"""Reference scores that give a result its scale: chance, the best shortcut and the ceiling of a
task, measured on the examples a model is evaluated on.

    refs = references(task, "test", num_examples=1000)
    refs.chance                      # uniform guessing over the classes / values
    refs.best_shortcut()             # ("fitted bigram", Estimate(0.413, 0.016))
    refs.ceiling["accuracy"]         # the best possible accuracy, with its standard error
    refs.fraction(0.30)              # a score as a fraction of the ceiling

    task            shortcut baselines (zoo.tasks.*)                  ceiling
    SymbolSoup      unigram, true bigram, fitted bigram               Bayes-optimal: mean max posterior of
                    (symbol_soup_baselines)                           the exact classifier (symbol_soup_bayes)
    Diffuse MQAR    first / last prefix match, most recent key        1: the whole key names its value
    MQAR            token, first last-token match (recall_shortcuts)  (checked: the whole-key rule scores 1)
    text LM         none (references() returns None)

Standard errors: SymbolSoup over examples (the ceiling: spread of the max posterior; a baseline:
binomial); recall tasks over examples (the queries of one example are not independent). The lag
buckets of Diffuse MQAR are scored by the task's own metric.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from zoo.tasks.base import IGNORE_INDEX, Task
from zoo.tasks.diffuse_mqar import DiffuseMQAR
from zoo.tasks.mqar import MQAR
from zoo.tasks.recall_shortcuts import SHORTCUTS, SOLUTION, predictions
from zoo.tasks.symbol_soup import NUM_CLASSES, SymbolSoup
from zoo.tasks.symbol_soup_baselines import BASELINES
from zoo.tasks.symbol_soup_bayes import log_posterior

METRIC = "accuracy"


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float | None = None

    def __str__(self) -> str:
        return self.format(3)

    def format(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f}" + (f" ± {self.se:.{digits}f}" if self.se is not None else "")


@dataclass
class References:
    """chance: accuracy of uniform guessing; baselines: name -> metric -> Estimate; ceiling:
    metric -> Estimate; extra: further estimates worth printing (name -> Estimate)."""

    task: str
    split: str
    num_examples: int
    chance: float
    baselines: dict[str, dict[str, Estimate]]
    ceiling_name: str
    ceiling: dict[str, Estimate]
    extra: dict[str, Estimate] = field(default_factory=dict)

    def best_shortcut(self, metric: str = METRIC) -> tuple[str, Estimate]:
        name = max(self.baselines, key=lambda k: self.baselines[k][metric].value)
        return name, self.baselines[name][metric]

    def fraction(self, value: float, metric: str = METRIC) -> float:
        """A score as a fraction of the ceiling."""
        return value / self.ceiling[metric].value

    def rows(self, digits: int = 4) -> dict[str, dict[str, str]]:
        """Table rows: label -> metric -> formatted value, for chance, the best shortcut and the
        ceiling (every metric the ceiling has: accuracy, and Diffuse MQAR's lag buckets)."""
        name, _ = self.best_shortcut()
        return {
            "chance": {m: f"{self.chance:.{digits}f}" for m in self.ceiling},
            f"best shortcut ({name})": {m: e.format(digits) for m, e in self.baselines[name].items()},
            f"ceiling ({self.ceiling_name})": {m: e.format(digits) for m, e in self.ceiling.items()},
        }

    def row_values(self) -> dict[str, float]:
        """The compared metric of each row of `rows` (for the fraction-of-ceiling column)."""
        return dict(zip(self.rows(), (self.chance, self.best_shortcut()[1].value, self.ceiling[METRIC].value)))

    def caption(self) -> str:
        return f"{self.task}; references on {self.num_examples} {self.split} examples"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> References:
        def est(x: dict) -> Estimate:
            return Estimate(**x)

        return cls(d["task"], d["split"], d["num_examples"], d["chance"],
                   {k: {m: est(e) for m, e in v.items()} for k, v in d["baselines"].items()},
                   d["ceiling_name"], {m: est(e) for m, e in d["ceiling"].items()},
                   {k: est(e) for k, e in d.get("extra", {}).items()})


def describe(task: Task) -> str:
    """The task and the settings its references depend on, in words."""
    if isinstance(task, SymbolSoup):
        return f"SymbolSoup {task.min_tokens}-{task.max_tokens} tokens"
    if isinstance(task, DiffuseMQAR):
        lo, hi = task.lag_ranges["train"]
        layout = (f", {task.front} same-prefix and {task.front} same-last-token look-alikes per key in the memory"
                  if task.front else "")
        return (f"Diffuse MQAR {task.P} pairs, {task.Q} queries, {task.L}-token keys, {task.K} keys x {task.V} values, "
                f"lags {lo}-{hi} (test {task.lag_ranges['test'][0]}-{task.lag_ranges['test'][1]}){layout}")
    if isinstance(task, MQAR):
        return f"MQAR vocabulary {task.vocab_size}, {task.seq_len} tokens, {task.P} pairs"
    return type(task).__name__


def _mean_se(x: np.ndarray) -> Estimate:
    return Estimate(float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


def _examples(task: Task, split: str, n: int, progress: bool) -> list[dict]:
    items = range(n)
    if progress:
        items = tqdm(items, desc=f"{type(task).__name__} {split} examples", unit="ex", leave=False)
    dataset = task.split(split)
    return [dataset[i] for i in items]


def symbol_soup_references(task: SymbolSoup, split: str, n: int, progress: bool = False) -> References:
    examples = _examples(task, split, n, progress)
    tokens, labels = [e["tokens"] for e in examples], torch.stack([e["label"] for e in examples])
    styles = task.left_styles + task.right_styles
    posterior = log_posterior(tokens, styles).exp()
    baselines = {}
    for name, block_model in BASELINES.items():
        hit = (log_posterior(tokens, styles, block_model).argmax(-1) == labels).double().numpy()
        baselines[name] = {METRIC: _mean_se(hit)}
    realised = (posterior.argmax(-1) == labels).double().numpy()
    return References(describe(task), split, n, 1 / NUM_CLASSES, baselines, "Bayes-optimal",
                      {METRIC: _mean_se(posterior.max(-1).values.numpy())},
                      {"Bayes-optimal, realised": _mean_se(realised)})


def recall_references(task: DiffuseMQAR | MQAR, split: str, n: int, progress: bool = False) -> References:
    rules = [*SHORTCUTS, SOLUTION]
    per_example: dict[str, list[float]] = {}
    preds: dict[str, list[np.ndarray]] = {}
    targets, extras = [], {}
    for ex in _examples(task, split, n, progress):
        scored = ex["targets"] != IGNORE_INDEX
        target = ex["targets"][scored].numpy()
        targets.append(target)
        for key, value in ex.items():
            if key not in ("tokens", "targets") and value.shape == ex["targets"].shape:
                extras.setdefault(key, []).append(value[scored])
        for rule, predicted in predictions(task, ex).items():
            per_example.setdefault(rule, []).append(float((predicted == target).mean()))
            preds.setdefault(rule, []).append(predicted)
    target = torch.from_numpy(np.concatenate(targets))
    extra = {k: torch.cat(v) for k, v in extras.items()}
    scores = {}
    for rule in (r for r in rules if r in preds):
        predicted = np.concatenate(preds[rule])
        one_hot = torch.zeros(len(target), task.vocab_size)
        known = predicted >= 0
        one_hot[torch.from_numpy(np.flatnonzero(known)), torch.from_numpy(predicted[known]).long()] = 1.0
        metrics = task.metrics(split)
        metrics.collection.update(one_hot, target, **extra)
        scores[rule] = {k: Estimate(float(v)) for k, v in metrics.compute().items() if not math.isnan(float(v))}
        scores[rule][METRIC] = _mean_se(np.array(per_example[rule]))
    values = task.V if isinstance(task, DiffuseMQAR) else task.vocab_size - task.vocab_size // 2
    solved = scores.pop(SOLUTION)
    if any(e.value != 1.0 for e in solved.values()):
        raise RuntimeError(f"the whole-key rule should answer every query of {describe(task)}; got {solved}")
    return References(describe(task), split, n, 1 / values, scores, "exact recall", {k: Estimate(1.0) for k in solved})


def references(task: Task, split: str = "test", num_examples: int | None = None,
               progress: bool = False) -> References | None:
    """Chance, shortcut baselines and the ceiling on the first `num_examples` examples of `split`
    (all if None), or None for a task without them (text LM)."""
    n = task.num_examples(split) if num_examples is None else min(num_examples, task.num_examples(split))
    if isinstance(task, SymbolSoup):
        return symbol_soup_references(task, split, n, progress)
    if isinstance(task, (DiffuseMQAR, MQAR)):
        return recall_references(task, split, n, progress)
    return None
