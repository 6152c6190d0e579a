"""Evaluation: the loss and a task's metrics over (part of) a split, on one or many processes.

    metrics = evaluate(model, task, "validation", batch_size=64, max_examples=1000)
    # {"loss": 1.23, "accuracy": 0.61, ...}

Under torchrun every rank evaluates an interleaved shard of the examples; the loss and the
torchmetrics states are summed over ranks, so every rank returns the same numbers.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.tasks.base import Task
from zoo.tasks.metrics import IGNORE_INDEX
from zoo.tasks.reference import METRIC, References
from zoo.train import distributed

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA and CPU for precision="bf16"; nothing for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_loss(model: nn.Module, batch: dict[str, Tensor], kind: str) -> tuple[Tensor, Tensor]:
    """Run the model on a collated batch -> (summed cross-entropy over the scored positions, logits).

    classification: model(tokens (B, T), position (B,)) -> logits (B, C), scored against label (B,).
    sequence / lm:  model(tokens (B, T)) -> logits (B, T, V), scored where targets != -100.
    The sum (not the mean) lets callers normalise by the scored count over micro-batches and ranks.
    """
    if kind == "classification":
        logits = model(batch["tokens"], batch["position"])
        return F.cross_entropy(logits.float(), batch["label"], reduction="sum"), logits
    logits = model(batch["tokens"])
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, logits


def scored_count(batch: dict[str, Tensor], kind: str) -> int:
    """Number of scored predictions in a batch (the denominator of the mean loss)."""
    return len(batch["label"]) if kind == "classification" else int((batch["targets"] != IGNORE_INDEX).sum())


def check_model_fits_task(model: nn.Module, task: Task) -> None:
    """The model's vocabulary and output must fit the task (errors name the gin macros to set)."""
    vocab = getattr(model, "vocab_size", None)
    if vocab is not None and vocab < task.vocab_size:
        raise ValueError(f"the model's vocab_size={vocab} is smaller than the task's vocab_size={task.vocab_size} "
                         f"({type(task).__name__}): set VOCAB = {task.vocab_size} in the gin config")
    classes = getattr(model, "num_classes", None)
    if task.kind == "classification":
        if classes is None:
            raise ValueError(f"{type(task).__name__} is a classification task but the model "
                             f"({type(model).__name__}) has no num_classes: use base/classifier.gin")
        if classes != task.num_classes:
            raise ValueError(f"the model has num_classes={classes} but {type(task).__name__} has "
                             f"{task.num_classes}: set NUM_CLASSES = {task.num_classes} in the gin config")
    elif classes is not None:
        raise ValueError(f"{type(task).__name__} predicts tokens (kind {task.kind!r}) but the model "
                         f"({type(model).__name__}) is a classifier: use base/lm.gin")


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: str, *, batch_size: int, max_examples: int | None = None,
             precision: str = "fp32") -> dict[str, float]:
    """Mean loss and the task's metrics over the first `max_examples` examples of `split` (all if
    None). Collective under torchrun: every rank must call it; each evaluates a shard."""
    dataset = task.split(split)
    n = len(dataset) if max_examples is None else min(max_examples, len(dataset))
    if n < 1:
        raise ValueError(f"nothing to evaluate: the {split} split has {len(dataset)} examples, max_examples={max_examples}")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if torch.distributed.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    mine = list(range(rank, n, world))
    # every rank runs the same number of forward passes (FSDP gathers weights inside them)
    num_batches = math.ceil(math.ceil(n / world) / batch_size)
    metrics = task.metrics(split).to(device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, scored count
    was_training = model.training
    model.eval()
    for b in range(num_batches):
        indices = mine[b * batch_size:(b + 1) * batch_size]
        batch = to_device(task.collate([dataset[i] for i in (indices or [0])]), device)
        with autocast(device, precision):
            loss_sum, logits = forward_loss(model, batch, task.kind)
        if indices:  # an empty shard still ran the forward pass above, but scores nothing
            metrics.update(logits.float(), batch)
            totals += torch.stack([loss_sum.double(), torch.tensor(scored_count(batch, task.kind), dtype=torch.float64, device=device)])
    model.train(was_training)
    distributed.all_reduce_sum(totals)
    out = {"loss": float(totals[0] / totals[1])}
    out.update({k: float(v) for k, v in metrics.compute().items()})
    return out


def metrics_table(results: dict[str, dict[str, float]], references: References | None = None) -> str:
    """A markdown table: one row per split, one column per metric (union, in first-seen order).
    With `references` (zoo.tasks.reference) three more rows, chance, the best shortcut and the
    ceiling, and a column with each accuracy as a fraction of the ceiling."""
    columns: list[str] = []
    for metrics in results.values():
        columns += [k for k in metrics if k not in columns]
    fraction = f"{METRIC} / ceiling"
    head = ["split", *columns] + ([fraction] if references else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for split, metrics in results.items():
        cells = [f"{metrics[c]:.4f}" if c in metrics else "" for c in columns]
        if references:
            cells.append(f"{references.fraction(metrics[METRIC]):.3f}" if METRIC in metrics else "")
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    if references:
        values = references.row_values()
        for label, cells in references.rows().items():
            row = [cells.get(c, "") for c in columns] + [f"{references.fraction(values[label]):.3f}"]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)
