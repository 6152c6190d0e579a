"""Task metrics: torchmetrics collections fed with (logits, batch).

    kind             metrics (names in compute())
    classification   accuracy                       MulticlassAccuracy over num_classes
    sequence         accuracy                       token accuracy over the scored positions
                     accuracy_lag_{lo}_{hi}         the same per lag bucket (Diffuse MQAR)
    lm               perplexity, top1, top5         exp(mean NLL); top-k token accuracy
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

IGNORE_INDEX = -100


class TokenPerplexity(Perplexity):
    """torchmetrics Perplexity on flat inputs: preds (N, V) logits, target (N,)."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(preds[None], target[None])


class LagBucketAccuracy(Metric):
    """Accuracy per lag bucket. edges e_0 < e_1 < ... < e_K give K buckets [e_0, e_1], (e_1, e_2],
    ..., (e_{K-1}, e_K]; lags outside [e_0, e_K] are not counted. compute() returns
    {"accuracy_lag_{lo}_{hi}": accuracy}, NaN for an empty bucket."""

    full_state_update = False

    def __init__(self, edges: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        edges = [int(e) for e in edges]
        if len(edges) < 2 or any(a >= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"edges must be at least two strictly increasing lags; got {edges}")
        self.edges = edges
        self.register_buffer("inner_edges", torch.tensor(edges[1:-1], dtype=torch.long), persistent=False)
        self.add_state("correct", torch.zeros(len(edges) - 1, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(edges) - 1, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, lag: Tensor) -> None:
        """preds (N, C) logits, target (N,), lag (N,)."""
        inside = (lag >= self.edges[0]) & (lag <= self.edges[-1])
        bucket = torch.bucketize(lag[inside], self.inner_edges.to(lag.device))  # e_k < lag <= e_{k+1}
        hit = (preds[inside].argmax(-1) == target[inside]).long()
        self.correct += torch.bincount(bucket, weights=hit, minlength=len(self.correct)).long()
        self.total += torch.bincount(bucket, minlength=len(self.total))

    def compute(self) -> dict[str, Tensor]:
        acc = self.correct.double() / self.total.double()  # 0 / 0 -> NaN for an empty bucket
        return {f"accuracy_lag_{lo}_{hi}": acc[k].float() for k, (lo, hi) in enumerate(zip(self.edges, self.edges[1:]))}


def default_metrics(kind: str, vocab_size: int, num_classes: int | None) -> dict[str, Metric]:
    """The standard metrics of a task kind (see the module docstring)."""
    if kind == "classification":
        return {"accuracy": MulticlassAccuracy(num_classes, average="micro")}
    if kind == "sequence":
        return {"accuracy": MulticlassAccuracy(vocab_size, average="micro")}
    if kind == "lm":
        return {
            "perplexity": TokenPerplexity(),
            "top1": MulticlassAccuracy(vocab_size, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(vocab_size, top_k=min(5, vocab_size), average="micro"),
        }
    raise ValueError(f"kind must be 'classification', 'sequence' or 'lm'; got {kind!r}")


class TaskMetrics(nn.Module):
    """A MetricCollection fed with (logits, batch) as produced by `Task.collate`.

    update(logits, batch):
        classification: logits (B, C) already read out, or (B, T, C) read out at batch["position"];
                        scored against batch["label"].
        sequence / lm:  logits (B, T, V); scored where batch["targets"] != -100.
    Every metric receives (preds (N, C) float32, target (N,)) and, as keyword arguments filtered by
    its update signature, the other per-token batch fields at the scored positions (e.g. lag).
    compute() -> dict name -> scalar tensor. `.to(device)` moves the metric states.
    """

    def __init__(self, kind: str, collection: MetricCollection):
        super().__init__()
        self.kind = kind
        self.collection = collection

    def _select(self, logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if self.kind == "classification":
            label = batch["label"]
            if logits.ndim == 3:
                logits = logits[torch.arange(len(logits), device=logits.device), batch["position"]]
            if logits.ndim != 2 or len(logits) != len(label):
                raise ValueError(f"classification logits must be (B, C) or (B, T, C) with B={len(label)}; got {tuple(logits.shape)}")
            return logits.float(), label, {}
        targets = batch["targets"]
        if logits.ndim != 3 or logits.shape[:2] != targets.shape:
            raise ValueError(f"logits must be (B, T, V) matching targets {tuple(targets.shape)}; got {tuple(logits.shape)}")
        scored = targets != IGNORE_INDEX
        extras = {
            key: value[scored]
            for key, value in batch.items()
            if key not in ("tokens", "targets", "mask") and value.shape == targets.shape
        }
        return logits[scored].float(), targets[scored], extras

    @torch.no_grad()
    def update(self, logits: Tensor, batch: dict[str, Tensor]) -> None:
        preds, target, extras = self._select(logits, batch)
        self.collection.update(preds, target, **extras)

    def compute(self) -> dict[str, Tensor]:
        return self.collection.compute()

    def reset(self) -> None:
        self.collection.reset()
