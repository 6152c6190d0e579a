"""Diffuse MQAR: multi-query associative recall with multi-token keys, prefix-sharing distractors
and an explicitly controlled lag (docs/tasks.md; our generator, the paper published none).

Layout (w = key_len + 1 tokens per pair):

    [memory: P pairs  k_1 .. k_L v][noise: D distractor pairs][queries: Q pairs k_1 .. k_L v]

Memory keys are distinct L-token tuples over the key vocabulary; values are distinct tokens of a
disjoint value vocabulary. A distractor copies the first L - 1 tokens of a random memory key, ends
in a different last token chosen so that the full distractor key equals no memory key, and carries
a random value. The queries are Q of the P memory pairs in random order, written like pairs; the
scored step is the last key token of each query, whose target is the pair's value.

Lag: for memory pair i queried in query slot j the lag is the distance between the key's two
occurrences, lag = w * (P - i + D + j) tokens. Each example draws the query order, then D
uniformly among the values that put every one of its Q lags inside the split's lag range
(train / validation: `lag_range`, test: `test_lag_range`, by default up to 4x the largest
training lag). The per-query lag is returned in the `lag` field and the metric reports accuracy
per lag bucket.

Token ids: 0 = <pad>, keys 1 .. K, values K + 1 .. K + V.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from zoo.tasks.base import IGNORE_INDEX, Task, check_positive_int, check_split, example_generator
from zoo.tasks.metrics import LagBucketAccuracy


class DiffuseMQAR(Task):
    """Args:
        num_pairs: P key-value pairs in memory.
        num_queries: Q <= P of them are queried.
        key_len: tokens per key (>= 1; distractors share the first key_len - 1).
        key_vocab_size: K > num_pairs key tokens.   value_vocab_size: V >= num_pairs value tokens.
        lag_range: (lo, hi) lags for train and validation.
        test_lag_range: (lo, hi) lags for test; default (lag_range[0], 4 * lag_range[1]).
        lag_buckets: increasing bucket edges for the per-lag metric; default
            (lo, hi, 2 hi, 3 hi, ..., test hi) with (lo, hi) = lag_range.
        num_train, num_validation, num_test: examples per split.   seed: seed of the examples.
    """

    name = "diffuse_mqar"

    def __init__(
        self,
        num_pairs: int = 16,
        num_queries: int = 8,
        key_len: int = 2,
        key_vocab_size: int = 64,
        value_vocab_size: int = 64,
        lag_range: Sequence[int] = (64, 256),
        test_lag_range: Sequence[int] | None = None,
        lag_buckets: Sequence[int] | None = None,
        num_train: int = 100_000,
        num_validation: int = 3_000,
        num_test: int = 3_000,
        seed: int = 0,
    ):
        self.P = check_positive_int("num_pairs", num_pairs)
        self.Q = check_positive_int("num_queries", num_queries)
        if self.Q > self.P:
            raise ValueError(f"num_queries={num_queries} must be <= num_pairs={num_pairs}")
        self.L = check_positive_int("key_len", key_len)
        self.K = check_positive_int("key_vocab_size", key_vocab_size)
        self.V = check_positive_int("value_vocab_size", value_vocab_size)
        if self.K <= self.P:
            raise ValueError(f"key_vocab_size={key_vocab_size} must exceed num_pairs={num_pairs} (distractors need a free last token)")
        if self.V < self.P:
            raise ValueError(f"value_vocab_size={value_vocab_size} must be >= num_pairs={num_pairs} (values are distinct)")
        if self.K**self.L >= 2**62:
            raise ValueError(f"key_vocab_size ** key_len = {self.K}**{self.L} is too large")
        self.w = self.L + 1
        lag_range = self._check_range("lag_range", lag_range)
        if test_lag_range is None:
            test_lag_range = (lag_range[0], 4 * lag_range[1])
        test_lag_range = self._check_range("test_lag_range", test_lag_range)
        self.lag_ranges = {"train": lag_range, "validation": lag_range, "test": test_lag_range}
        if lag_buckets is None:
            lo, hi = lag_range
            top = max(hi, test_lag_range[1])
            lag_buckets = [min(lo, test_lag_range[0]), *range(hi, top, hi), top]
        self.lag_buckets = [int(e) for e in lag_buckets]
        if len(self.lag_buckets) < 2 or any(a >= b for a, b in zip(self.lag_buckets, self.lag_buckets[1:])):
            raise ValueError(f"lag_buckets must be at least two strictly increasing lags; got {list(lag_buckets)}")
        self.sizes = {
            "train": check_positive_int("num_train", num_train),
            "validation": check_positive_int("num_validation", num_validation),
            "test": check_positive_int("num_test", num_test),
        }
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.kind = "sequence"
        self.vocab_size = 1 + self.K + self.V
        self.pad_id = 0
        # longest example: D = floor(hi / w) - Q when the queries ask the last Q pairs in order
        self.seq_len = self.w * (self.P + max(hi // self.w for _, hi in self.lag_ranges.values()))

    def _check_range(self, name: str, lags: Sequence[int]) -> tuple[int, int]:
        lo, hi = (int(x) for x in lags)
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi; got {tuple(lags)}")
        # lag = w * (P + D + j - i) with D >= 0 and j - i anywhere in [-(P - 1), Q - 1]
        c_lo, c_hi = math.ceil(lo / self.w), hi // self.w
        if c_hi - c_lo < self.P + self.Q - 2 or c_hi < self.P + self.Q - 1:
            raise ValueError(
                f"{name}={tuple(lags)} is too narrow for num_pairs={self.P}, num_queries={self.Q}, key_len={self.L}: "
                f"lags are multiples of w={self.w} and one example spans up to {(self.P + self.Q - 2) * self.w} of lag, "
                f"so it needs hi // {self.w} - ceil(lo / {self.w}) >= {self.P + self.Q - 2} and hi >= {(self.P + self.Q - 1) * self.w}"
            )
        return lo, hi

    def num_examples(self, split: str) -> int:
        return self.sizes[check_split(split)]

    def example(self, split: str, index: int) -> dict[str, Tensor]:
        rng = example_generator(self.seed, split, index)
        P, Q, L, K, w = self.P, self.Q, self.L, self.K, self.w
        codes = rng.choice(K**L, size=P, replace=False)  # distinct keys as base-K numbers
        keys = (codes[:, None] // K ** np.arange(L - 1, -1, -1)) % K  # (P, L) digits, first token first
        values = rng.choice(self.V, size=P, replace=False)
        asked = rng.choice(P, size=Q, replace=False)  # memory pair asked in query slot j
        d = np.arange(Q) - asked
        lo, hi = self.lag_ranges[split]
        D = int(rng.integers(max(0, math.ceil(lo / w) - P - d.min()), hi // w - P - d.max() + 1))
        # distractors: a memory key's prefix and a last token that makes no memory key
        source = rng.integers(P, size=D)
        prefix = codes[source] // K
        last = rng.integers(K, size=D)
        clash = np.isin(prefix * K + last, codes)
        while clash.any():  # rejection = uniform over the allowed last tokens
            last[clash] = rng.integers(K, size=int(clash.sum()))
            clash = np.isin(prefix * K + last, codes)
        distractor_keys = np.concatenate([keys[source, : L - 1], last[:, None]], axis=1)
        key_ids, value_ids = 1 + keys, 1 + K + values
        rows = np.concatenate(
            [
                np.concatenate([key_ids, value_ids[:, None]], axis=1),
                np.concatenate([1 + distractor_keys, 1 + K + rng.integers(self.V, size=(D, 1))], axis=1),
                np.concatenate([key_ids[asked], value_ids[asked, None]], axis=1),
            ]
        )  # (P + D + Q, w)
        tokens = torch.from_numpy(rows.reshape(-1)).long()
        scored = w * (P + D + np.arange(Q)) + L - 1  # last key token of each query
        targets = torch.full_like(tokens, IGNORE_INDEX)
        targets[scored] = torch.from_numpy(value_ids[asked]).long()
        lag = torch.full_like(tokens, -1)
        lag[scored] = torch.from_numpy(w * (P + D + d)).long()
        return {"tokens": tokens, "targets": targets, "lag": lag}

    def metric_dict(self, split: str) -> dict[str, Metric]:
        """Token accuracy, and accuracy per lag bucket over the buckets this split's lags reach."""
        lo, hi = self.lag_ranges[split]
        e = self.lag_buckets
        reach = [k for k in range(len(e) - 1) if e[k] <= hi and e[k + 1] >= lo and (k == 0 or e[k] < hi)]
        metrics = super().metric_dict(split)
        if reach:
            metrics["accuracy_by_lag"] = LagBucketAccuracy(e[reach[0] : reach[-1] + 2])
        return metrics
