"""MQAR: zoology's multi-query associative recall (`multiquery_ar`), generated per example.

Layout of one sequence of seq_len tokens:

    k_1 v_1 k_2 v_2 ... k_P v_P | query region of seq_len - 2P tokens

Keys are P distinct tokens of [1, vocab/2), values P distinct tokens of [vocab/2, vocab). The
query region has (seq_len - 2P) / 2 two-token slots; key k_i is placed at the start of slot g_i,
the slots drawn without replacement with P(g) proportional to power_a * (g + 1) ** (power_a - 1)
(a power law favouring short distances). The step holding a query key is scored with target
v_i (the value "follows" it as the next-token target). Every other token of the query region is
uniform over the whole vocabulary (zoology's random_non_queries=True) or 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from zoo.tasks.base import IGNORE_INDEX, Task, check_positive_int


class MQAR(Task):
    """Args:
        vocab_size: total vocabulary (keys in the lower half, values in the upper half).
        seq_len: tokens per example (even).
        num_pairs: P key-value pairs (4 P <= seq_len).
        power_a: power-law exponent of the query placement (zoology's default 0.01).
        random_non_queries: fill the unused query-region steps with random tokens (else 0).
        num_train, num_validation, num_test: examples per split.   seed: seed of the examples.
    """

    name = "mqar"

    def __init__(
        self,
        vocab_size: int = 8192,
        seq_len: int = 256,
        num_pairs: int = 16,
        power_a: float = 0.01,
        random_non_queries: bool = True,
        num_train: int = 100_000,
        num_validation: int = 3_000,
        num_test: int = 3_000,
        seed: int = 0,
    ):
        self.vocab_size = check_positive_int("vocab_size", vocab_size, minimum=4)
        self.seq_len = check_positive_int("seq_len", seq_len, minimum=4)
        self.P = check_positive_int("num_pairs", num_pairs)
        if seq_len % 2:
            raise ValueError(f"seq_len must be even; got {seq_len}")
        if 4 * num_pairs > seq_len:
            raise ValueError(f"num_pairs={num_pairs} needs seq_len >= 4 * num_pairs = {4 * num_pairs}; got {seq_len}")
        if num_pairs >= vocab_size // 2:
            raise ValueError(f"num_pairs={num_pairs} needs vocab_size > 2 * (num_pairs + 1); got {vocab_size}")
        if not power_a > 0:
            raise ValueError(f"power_a must be > 0; got {power_a}")
        self.random_non_queries = bool(random_non_queries)
        self.set_splits(num_train, num_validation, num_test, seed)
        self.kind = "sequence"
        self.pad_id = 0
        self.num_slots = (seq_len - 2 * num_pairs) // 2
        p = power_a * np.arange(1, self.num_slots + 1) ** (power_a - 1)
        self.slot_probs = p / p.sum()

    def example(self, split: str, index: int) -> dict[str, Tensor]:
        rng = self.generator(split, index)
        P, T, half = self.P, self.seq_len, self.vocab_size // 2
        keys = 1 + rng.choice(half - 1, size=P, replace=False)
        values = half + rng.choice(self.vocab_size - half, size=P, replace=False)
        slots = rng.choice(self.num_slots, size=P, replace=False, p=self.slot_probs)
        tokens = np.zeros(T, dtype=np.int64)
        tokens[0 : 2 * P : 2], tokens[1 : 2 * P : 2] = keys, values
        query_pos = 2 * P + 2 * slots
        tokens[query_pos] = keys
        if self.random_non_queries:
            free = np.ones(T, dtype=bool)
            free[: 2 * P] = False
            free[query_pos] = False
            tokens[free] = rng.integers(self.vocab_size, size=int(free.sum()))
        targets = np.full(T, IGNORE_INDEX, dtype=np.int64)
        targets[query_pos] = values
        return {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets)}
