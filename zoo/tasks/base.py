"""The task contract: splits of generated examples, a padding collate, and metrics.

A task is built from plain keyword arguments and exposes

    task.vocab_size     input vocabulary (token ids lie in [0, vocab_size))
    task.seq_len        the longest example any split can produce
    task.kind           "classification" | "sequence" | "lm"
    task.num_classes    number of classes ("classification" only, else None)
    task.pad_id         token id used by `collate` for right padding
    task.split(name)    torch Dataset of example dicts, name in "train" / "validation" / "test"
    task.collate(exs)   list of example dicts -> batch dict of padded tensors
    task.metrics(split) TaskMetrics: update(logits, batch), compute() -> dict[str, Tensor]

An example is a dict of tensors:
    tokens   (T,) long   input ids
    targets  (T,) long   what the logits at step t must predict; IGNORE_INDEX (-100) where not
                         scored. For next-token tasks targets[t] is already the next token (no
                         shift needed); for classification targets[position] = label.
    label    ()   long   class id in [0, num_classes)          (classification only)
    position ()   long   index of the readout step, T - 1      (classification only)
    lag      (T,) long   distance to the memorised pair, -1 where not scored (Diffuse MQAR only)

Examples are generated lazily from (task seed, split, index) through `numpy.random.SeedSequence`,
so building a task is instant, every example is reproducible on its own, and the three splits draw
from independent streams.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchmetrics import Metric, MetricCollection

from zoo.tasks.metrics import IGNORE_INDEX, TaskMetrics, default_metrics

SPLITS = ("train", "validation", "test")
_SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}
# Per-token fields other than tokens / targets and the value collate pads them with.
_EXTRA_PAD = {"lag": -1}


def check_split(name: str) -> str:
    if name not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {SPLITS}; got {name!r}")
    return name


def seed_sequence(seed: int, split: str, stream: int, index: int = 0) -> np.random.SeedSequence:
    """Independent entropy for (task seed, split, stream, index); `stream` separates uses
    (0: examples, 1: per-split label order)."""
    return np.random.SeedSequence([seed, _SPLIT_CODE[check_split(split)], stream, index])


def example_generator(seed: int, split: str, index: int) -> np.random.Generator:
    """numpy Generator for one example."""
    return np.random.default_rng(seed_sequence(seed, split, 0, index))


def example_random(seed: int, split: str, index: int) -> random.Random:
    """Python Random for one example (faster than numpy for scalar-by-scalar sampling)."""
    state = seed_sequence(seed, split, 0, index).generate_state(4, np.uint32)
    return random.Random(int.from_bytes(state.tobytes(), "little"))


def check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


class TaskSplit(Dataset):
    """One split of a task: a map-style Dataset whose items are generated on access."""

    def __init__(self, task: Task, name: str):
        self.task = task
        self.name = check_split(name)
        self.length = task.num_examples(name)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for the {self.name} split of {self.length} examples")
        return self.task.example(self.name, int(index))

    def __repr__(self) -> str:
        return f"TaskSplit({type(self.task).__name__}, {self.name!r}, {self.length} examples)"


class Task(ABC):
    """Base class; subclasses set the attributes below in __init__ and implement `example`.
    Generated tasks call `set_splits(num_train, num_validation, num_test, seed)` in __init__;
    tasks whose splits are not generated (text) override `num_examples` instead."""

    name: ClassVar[str]
    kind: str
    vocab_size: int
    seq_len: int
    num_classes: int | None = None
    pad_id: int = 0
    sizes: dict[str, int]
    seed: int

    def set_splits(self, num_train: int, num_validation: int, num_test: int, seed: int) -> None:
        """Validate and store the split sizes (each >= 1) and the seed of the examples (>= 0)."""
        self.sizes = {
            "train": check_positive_int("num_train", num_train),
            "validation": check_positive_int("num_validation", num_validation),
            "test": check_positive_int("num_test", num_test),
        }
        self.seed = check_positive_int("seed", seed, minimum=0)

    def num_examples(self, split: str) -> int:
        """Number of examples in a split."""
        return self.sizes[check_split(split)]

    def generator(self, split: str, index: int) -> np.random.Generator:
        """The numpy Generator of one example (independent per task seed, split and index)."""
        return example_generator(self.seed, split, index)

    @abstractmethod
    def example(self, split: str, index: int) -> dict[str, Tensor]:
        """Example `index` of `split` (deterministic)."""

    def split(self, name: str) -> TaskSplit:
        return TaskSplit(self, name)

    def collate(self, examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Right-pad a list of examples into a batch.

        Returns tokens (B, T) padded with pad_id, targets (B, T) padded with IGNORE_INDEX,
        mask (B, T) bool (True on real tokens), lengths (B,), the per-token extras padded with
        their own fill value (lag: -1), and the scalar fields (label, position) stacked to (B,).
        T is the longest example in the batch.
        """
        if not examples:
            raise ValueError("collate needs at least one example")
        lengths = torch.tensor([len(ex["tokens"]) for ex in examples])
        B, T = len(examples), int(lengths.max())
        fills = {"tokens": self.pad_id, "targets": IGNORE_INDEX, **_EXTRA_PAD}
        batch: dict[str, Tensor] = {}
        for key, first in examples[0].items():
            if first.ndim == 0:
                batch[key] = torch.stack([ex[key] for ex in examples])
                continue
            if key not in fills:
                raise ValueError(f"collate does not know how to pad per-token field {key!r}")
            out = torch.full((B, T), fills[key], dtype=first.dtype)
            for b, ex in enumerate(examples):
                out[b, : len(ex[key])] = ex[key]
            batch[key] = out
        batch["mask"] = torch.arange(T)[None] < lengths[:, None]
        batch["lengths"] = lengths
        return batch

    def metrics(self, split: str = "validation") -> TaskMetrics:
        """Fresh metrics for evaluating a split (see `zoo.tasks.metrics`)."""
        collection = MetricCollection(self.metric_dict(check_split(split)), compute_groups=False)
        return TaskMetrics(self.kind, collection)

    def metric_dict(self, split: str) -> dict[str, Metric]:
        """The metrics of this task's kind; tasks add their own by overriding."""
        return default_metrics(self.kind, self.vocab_size, self.num_classes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, seq_len={self.seq_len})"
