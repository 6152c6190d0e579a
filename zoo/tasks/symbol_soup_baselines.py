"""Cheaper SymbolSoup classifiers than the exact Bayes one: each scores a stylized block with a
simpler letter model per style and then classifies exactly like the Bayes classifier (both block
orders, uniform prior; `symbol_soup_bayes.log_posterior(..., block_model=...)`).

    unigram        letters i.i.d. from the style's unigram weights (3 / 2 / 1), seen through
                   the flip channel
    true bigram    the style's own Markov step (unigram x 4 on preferred bigrams; the first letter
                   from the unigram weights), seen through the flip channel: the generator
                   without its motifs
    fitted bigram  first-letter and bigram frequencies counted on letters sampled from the
                   style's own block generator (motifs and flips included), add-one smoothed: the
                   best a bigram model can learn with unlimited data
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from zoo.tasks.symbol_soup import NUM_LETTERS, Style
from zoo.tasks.symbol_soup_bayes import flip_channel, markov_tables, padded

FIT_BLOCKS, FIT_BLOCK_LEN = 1000, 100  # letters sampled per style for the fitted bigram


def _score(blocks: Sequence[np.ndarray], first: Tensor, step: Tensor) -> Tensor:
    """sum_t log p(y_t | y_{t-1}) with log p(y_0) = first[s, y_0] (S, 16) and step[s, a, b] (S, 16, 16)
    -> (B, S), from each block's bigram counts."""
    letters, lengths = padded(blocks)
    inside = torch.arange(1, letters.shape[1])[None] < lengths[:, None]  # (B, N - 1) real bigrams
    counts = torch.zeros(len(blocks), NUM_LETTERS**2, dtype=torch.float64)
    counts.scatter_add_(1, letters[:, :-1] * NUM_LETTERS + letters[:, 1:], inside.double())
    return first[:, letters[:, 0]].T + counts @ step.reshape(len(step), -1).T


def unigram_log_likelihood(blocks: Sequence[np.ndarray], styles: Sequence[Style]) -> Tensor:
    u = torch.tensor([s.unigram for s in styles], dtype=torch.float64)
    u = (u / u.sum(-1, keepdim=True)) @ flip_channel()
    return _score(blocks, u.log(), u.log()[:, None].expand(-1, NUM_LETTERS, -1))


def true_bigram_log_likelihood(blocks: Sequence[np.ndarray], styles: Sequence[Style]) -> Tensor:
    T = markov_tables(styles) @ flip_channel()  # (S, 17, 16): next observed letter from the previous clean one
    return _score(blocks, T[:, NUM_LETTERS].log(), T[:, :NUM_LETTERS].log())


@lru_cache(maxsize=16)
def _fitted_tables(orders: tuple[tuple[int, ...], ...], seed: int) -> tuple[Tensor, Tensor]:
    firsts, steps = [], []
    for order in orders:
        style, rng = Style(order), random.Random(seed)
        first, step = np.ones(NUM_LETTERS), np.ones((NUM_LETTERS, NUM_LETTERS))  # add-one
        for _ in range(FIT_BLOCKS):
            block = np.array(style.block(FIT_BLOCK_LEN, rng))
            first[block[0]] += 1
            np.add.at(step, (block[:-1], block[1:]), 1)
        firsts.append(np.log(first / first.sum()))
        steps.append(np.log(step / step.sum(1, keepdims=True)))
    return torch.tensor(np.array(firsts)), torch.tensor(np.array(steps))


def fitted_bigram_log_likelihood(blocks: Sequence[np.ndarray], styles: Sequence[Style], seed: int = 0) -> Tensor:
    first, step = _fitted_tables(tuple(s.order for s in styles), seed)
    return _score(blocks, first, step)


BASELINES = {"unigram": unigram_log_likelihood, "true bigram": true_bigram_log_likelihood,
             "fitted bigram": fitted_bigram_log_likelihood}
