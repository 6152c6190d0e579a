"""Shortcut baselines for the recall tasks: simple rules that answer a query without matching the
whole key, and the whole-key rule that answers every query (the ceiling, 1.0 by construction).

Every rule sees only the tokens before the scored step and returns the predicted value token
(-1: no prediction, counted wrong). On Diffuse MQAR a "pair" is any row of w = key_len + 1 tokens
before the query (memory, distractors and earlier queries alike); on MQAR the pairs are the memory's
`k v` pairs.

    rule                    answer
    first prefix match      value of the first pair whose key shares the query's first key_len - 1 tokens
    last prefix match       value of the most recent such pair
    most recent key token   the token after the most recent earlier occurrence of the query's last
                            key token (a one-token induction head)
    first last-token match  value of the first pair whose last key token is the query's
    whole key               value of the first pair with the same whole key (the task's solution)

With one-token keys (MQAR, or key_len = 1) the prefix is empty: the prefix rules answer with the
first / last pair's value, and the last-token rule is the whole-key rule (left out).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from zoo.tasks.base import IGNORE_INDEX
from zoo.tasks.diffuse_mqar import DiffuseMQAR
from zoo.tasks.mqar import MQAR

SHORTCUTS = ("first prefix match", "last prefix match", "most recent key token", "first last-token match")
SOLUTION = "whole key"


def _first(hit: np.ndarray) -> np.ndarray:
    """Index of the first True per row of hit (Q, R), -1 where none."""
    return np.where(hit.any(1), hit.argmax(1), -1)


def _last(hit: np.ndarray) -> np.ndarray:
    R = hit.shape[1]
    return np.where(hit.any(1), R - 1 - hit[:, ::-1].argmax(1), -1)


def most_recent_token(tokens: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """The token after the most recent earlier occurrence of tokens[t], for every t in scored (-1: none)."""
    out = np.full(len(scored), -1)
    for n, t in enumerate(scored):
        seen = np.flatnonzero(tokens[:t] == tokens[t])
        if len(seen):
            out[n] = tokens[seen[-1] + 1]
    return out


def pair_rules(keys: np.ndarray, values: np.ndarray, visible: np.ndarray, query_keys: np.ndarray) -> dict[str, np.ndarray]:
    """keys (R, L), values (R,) of the pairs; visible (Q, R) which pairs each query sees;
    query_keys (Q, L) -> predicted value (Q,) per pair rule (-1: none). With one-token keys the
    last-token rule is the whole-key rule and is left out."""
    prefix = (keys[None, :, :-1] == query_keys[:, None, :-1]).all(-1) & visible  # (Q, R)
    last = (keys[None, :, -1] == query_keys[:, None, -1]) & visible
    whole = prefix & last

    def value(index: np.ndarray) -> np.ndarray:
        return np.where(index >= 0, values[index], -1)

    out = {"first prefix match": value(_first(prefix)), "last prefix match": value(_last(prefix))}
    if keys.shape[1] > 1:
        out["first last-token match"] = value(_first(last))
    out[SOLUTION] = value(_first(whole))
    return out


def diffuse_mqar_predictions(task: DiffuseMQAR, example: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Per rule: the predicted value (Q,) at each scored step of one Diffuse MQAR example."""
    tokens = example["tokens"].numpy()
    rows = tokens.reshape(-1, task.w)  # (R, w): every row is a pair
    scored = np.flatnonzero(example["targets"].numpy() != IGNORE_INDEX)
    query_rows = scored // task.w
    visible = np.arange(len(rows))[None] < query_rows[:, None]
    out = pair_rules(rows[:, :-1], rows[:, -1], visible, rows[query_rows, :-1])
    out["most recent key token"] = most_recent_token(tokens, scored)
    return out


def mqar_predictions(task: MQAR, example: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Per rule: the predicted value at each scored step of one MQAR example (pairs: the memory)."""
    tokens = example["tokens"].numpy()
    pairs = tokens[: 2 * task.P].reshape(-1, 2)
    scored = np.flatnonzero(example["targets"].numpy() != IGNORE_INDEX)
    visible = np.ones((len(scored), len(pairs)), dtype=bool)
    out = pair_rules(pairs[:, :1], pairs[:, 1], visible, tokens[scored, None])
    out["most recent key token"] = most_recent_token(tokens, scored)
    return out


def predictions(task: DiffuseMQAR | MQAR, example: dict[str, Tensor]) -> dict[str, np.ndarray]:
    if isinstance(task, DiffuseMQAR):
        return diffuse_mqar_predictions(task, example)
    if isinstance(task, MQAR):
        return mqar_predictions(task, example)
    raise TypeError(f"recall shortcuts are defined for DiffuseMQAR and MQAR; got {type(task).__name__}")
