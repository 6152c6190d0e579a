"""Diffuse MQAR: multi-query associative recall with multi-token keys, prefix-sharing distractors
and an explicitly controlled lag (docs/tasks.md; our generator, the paper published none).

Layout (w = key_len + 1 tokens per pair):

    [memory: P pairs  k_1 .. k_L v][noise: D distractor pairs][queries: Q pairs k_1 .. k_L v]

Memory keys are distinct L-token tuples over the key vocabulary; values are distinct tokens of a
disjoint value vocabulary. A distractor copies the first L - 1 tokens of a random memory key, ends
in a different last token chosen so that the full distractor key equals no memory key, and carries
a random value. The queries are Q of the P memory pairs in random order, written like pairs; the
scored step is the last key token of each query, whose target is the pair's value.

In this layout (the paper's, the default) every distractor follows the memory, so answering with
the value of the *first* pair whose key shares the query's prefix (or its last token) recovers
most answers without matching whole keys. `front_distractors = c > 0` takes that shortcut away:
the memory block then holds, in a uniformly random order, the P memory pairs and, for every
memory key, c distractors that share its prefix (a different last token, as above) and c that
share its last token (a different prefix, again never a memory key): F = P (1 + 2c) rows. A rule
that matches only part of the key then finds the memory pair first (or last) only when it happens
to precede (or follow) its c look-alikes of that kind; only whole-key matching is always right.

Lag: for memory pair i at row r_i of the memory block (r_i = i in the paper's layout), queried in
query slot j, the lag is the distance between the key's two occurrences, lag = w * (F - r_i + D + j)
tokens. Each example draws the query order, then D uniformly among the values that put every one
of its Q lags inside the split's lag range (train / validation: `lag_range`, test:
`test_lag_range`, by default up to 4x the largest training lag). The per-query lag is returned in
the `lag` field and the metric reports accuracy per lag bucket.

Token ids: 0 = <pad>, keys 1 .. K, values K + 1 .. K + V.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from zoo.tasks.base import IGNORE_INDEX, Task, check_positive_int
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
        front_distractors: c look-alikes of each kind (same prefix, same last token) per memory key
            mixed into the memory block (0: the paper's layout, every distractor after the memory;
            c > 0 needs key_len >= 2).
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
        front_distractors: int = 0,
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
        self.front = check_positive_int("front_distractors", front_distractors, minimum=0)
        if self.front and self.L < 2:
            raise ValueError(f"front_distractors={front_distractors} needs key_len >= 2 (look-alikes share part of a key); "
                             f"got key_len={key_len}")
        self.F = self.P * (1 + 2 * self.front)  # rows of the memory block
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
        self.set_splits(num_train, num_validation, num_test, seed)
        self.kind = "sequence"
        self.vocab_size = 1 + self.K + self.V
        self.pad_id = 0
        # longest example: D = floor(hi / w) - Q when the queries ask the last Q rows of the memory in order
        self.seq_len = self.w * (self.F + max(hi // self.w for _, hi in self.lag_ranges.values()))

    def _check_range(self, name: str, lags: Sequence[int]) -> tuple[int, int]:
        lo, hi = (int(x) for x in lags)
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi; got {tuple(lags)}")
        # lag = w * (F + D + j - r) with D >= 0 and j - r anywhere in [-(F - 1), Q - 1]
        c_lo, c_hi = math.ceil(lo / self.w), hi // self.w
        spread = self.F + self.Q - 2
        if c_hi - c_lo < spread or c_hi < spread + 1:
            raise ValueError(
                f"{name}={tuple(lags)} is too narrow for num_pairs={self.P}, num_queries={self.Q}, key_len={self.L}, "
                f"front_distractors={self.front}: lags are multiples of w={self.w} and one example spans up to "
                f"{spread * self.w} of lag, so it needs hi // {self.w} - ceil(lo / {self.w}) >= {spread} and "
                f"hi >= {(spread + 1) * self.w}"
            )
        return lo, hi

    def example(self, split: str, index: int) -> dict[str, Tensor]:
        rng = self.generator(split, index)
        P, Q, L, K, w = self.P, self.Q, self.L, self.K, self.w
        codes = rng.choice(K**L, size=P, replace=False)  # distinct keys as base-K numbers
        keys = (codes[:, None] // K ** np.arange(L - 1, -1, -1)) % K  # (P, L) digits, first token first
        values = rng.choice(self.V, size=P, replace=False)
        memory = np.concatenate([1 + keys, 1 + K + values[:, None]], axis=1)  # (P, w) token rows
        asked = rng.choice(P, size=Q, replace=False)  # memory pair asked in query slot j
        row = np.arange(P)  # row of each memory pair in the memory block
        if self.front:
            source = np.repeat(np.arange(P), self.front)
            decoys = np.concatenate([self._distractors(rng, codes, source), self._distractors(rng, codes, source, same="last")])
            order = rng.permutation(self.F)  # block row -> pair (< P) or decoy
            memory = np.concatenate([memory, decoys])[order]
            row = np.argsort(order)[:P]
        d = np.arange(Q) - row[asked]
        lo, hi = self.lag_ranges[split]
        D = int(rng.integers(max(0, math.ceil(lo / w) - self.F - d.min()), hi // w - self.F - d.max() + 1))
        noise = self._distractors(rng, codes, rng.integers(P, size=D))
        queries = np.concatenate([1 + keys[asked], 1 + K + values[asked, None]], axis=1)
        tokens = torch.from_numpy(np.concatenate([memory, noise, queries]).reshape(-1)).long()  # (F + D + Q) w
        scored = w * (self.F + D + np.arange(Q)) + L - 1  # last key token of each query
        targets = torch.full_like(tokens, IGNORE_INDEX)
        targets[scored] = torch.from_numpy(queries[:, -1]).long()
        lag = torch.full_like(tokens, -1)
        lag[scored] = torch.from_numpy(w * (self.F + D + d)).long()
        return {"tokens": tokens, "targets": targets, "lag": lag}

    def _distractors(self, rng: np.random.Generator, codes: np.ndarray, source: np.ndarray, same: str = "prefix") -> np.ndarray:
        """Token rows (len(source), w) that look like memory key `source[n]` but are no memory key,
        with a random value. same="prefix": its first L - 1 tokens and a new last token;
        same="last": its last token and new first L - 1 tokens (uniform over the allowed ones)."""
        K, L, n = self.K, self.L, len(source)
        kept = codes[source] // K if same == "prefix" else codes[source] % K
        size = K if same == "prefix" else K ** (L - 1)

        def join(new: np.ndarray) -> np.ndarray:
            return kept * K + new if same == "prefix" else new * K + kept

        new = rng.integers(size, size=n)
        clash = np.isin(join(new), codes)
        while clash.any():  # rejection = uniform over the allowed tokens
            new[clash] = rng.integers(size, size=int(clash.sum()))
            clash = np.isin(join(new), codes)
        digits = (join(new)[:, None] // K ** np.arange(L - 1, -1, -1)) % K  # (n, L), first token first
        return np.concatenate([1 + digits, 1 + K + rng.integers(self.V, size=(n, 1))], axis=1)

    def metric_dict(self, split: str) -> dict[str, Metric]:
        """Token accuracy, and accuracy per lag bucket over the buckets this split's lags reach."""
        lo, hi = self.lag_ranges[split]
        e = self.lag_buckets
        reach = [k for k in range(len(e) - 1) if e[k] <= hi and e[k + 1] >= lo and (k == 0 or e[k] < hi)]
        metrics = super().metric_dict(split)
        if reach:
            metrics["accuracy_by_lag"] = LagBucketAccuracy(e[reach[0] : reach[-1] + 2])
        return metrics
