"""SymbolSoup follows docs/tasks.md: the example layout, balanced classes, deterministic and disjoint
splits, and style families whose statistics match the task's specification."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch

from zoo.tasks import IGNORE_INDEX, SymbolSoup
from zoo.tasks.symbol_soup import LETTERS, MOTIFS, style_family

LETTER_RUN = r"[a-p](?: [a-p])*"
LAYOUT = re.compile(
    rf"<bos>\n({LETTER_RUN})\n<sep1>\n({LETTER_RUN})\n<sep2>\n({LETTER_RUN})\n<sep1>\n({LETTER_RUN})\n<sep2>\n({LETTER_RUN})\n<sep> <label>"
)


def parse(task: SymbolSoup, tokens: torch.Tensor) -> list[list[int]]:
    """Letters of the five blocks: noise, stylized, noise, stylized, noise."""
    match = LAYOUT.fullmatch(task.tokenizer.decode(tokens))
    assert match is not None
    return [[LETTERS.index(c) for c in block.split(" ")] for block in match.groups()]


@pytest.mark.parametrize("bounds", [(400, 600), (2000, 2100)])
def test_symbol_soup_length_and_layout(bounds):
    lo, hi = bounds
    task = SymbolSoup(min_tokens=lo, max_tokens=hi, num_train=60)
    assert task.seq_len <= hi and task.vocab_size == 26 and task.num_classes == 20
    ids = task.tokenizer.ids
    for i in range(60):
        ex = task.split("train")[i]
        tokens, T = ex["tokens"], len(ex["tokens"])
        blocks = parse(task, tokens)
        M = sum(map(len, blocks))
        assert T == 2 * M + 13 and lo <= T <= hi and T <= task.seq_len
        assert tokens[0] == ids["<bos>"] and tokens[-3:].tolist() == [ids["<sep>"], ids[" "], ids["<label>"]]
        # noise share N as specified
        N = len(blocks[0]) + len(blocks[2]) + len(blocks[4])
        n_lo = max(3, math.floor(0.3 * M))
        assert min(n_lo, M - 2) <= N <= min(max(n_lo, math.floor(0.6 * M)), M - 2)
        assert ex["position"] == T - 1 and ex["label"] == task.labels("train")[i]
        assert ex["targets"][T - 1] == ex["label"] and (ex["targets"][:-1] == IGNORE_INDEX).all()


def test_symbol_soup_balanced_classes():
    task = SymbolSoup(num_validation=2000, num_test=30)
    assert np.bincount(task.labels("validation"), minlength=20).tolist() == [100] * 20
    counts = np.bincount(task.labels("test"), minlength=20)
    assert counts.sum() == 30 and counts.max() - counts.min() <= 1


def test_symbol_soup_deterministic_and_disjoint():
    a, b, c = SymbolSoup(), SymbolSoup(), SymbolSoup(seed=1)
    seqs = {}
    for split in ("train", "validation", "test"):
        for i in range(50):
            x = a.split(split)[i]["tokens"]
            assert torch.equal(x, b.split(split)[i]["tokens"])
            seqs.setdefault(split, set()).add(tuple(x.tolist()))
    assert len(seqs["train"] | seqs["validation"] | seqs["test"]) == 150
    assert not torch.equal(a.split("train")[0]["tokens"], c.split("train")[0]["tokens"])


def test_style_families_follow_the_documented_derivation():
    for seed, count in ((123, 4), (456, 5)):
        rng = random.Random(seed)
        for style in style_family(seed, count):
            letters = list(LETTERS)
            rng.shuffle(letters)
            assert [LETTERS[i] for i in style.order] == letters
            assert len(style.preferred) == 20
    assert len(MOTIFS) == 39


SPEC_MOTIFS = [
    [LETTERS.index(c) for c in LETTERS[i : i + n]] for n in (3, 4, 5) for i in range(16 - n + 1)
]


def spec_style(order) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unigram weights (16,), preferred bigram mask (16, 16) and motif weights (39,) written
    directly from docs/tasks.md for a shuffled letter order."""
    P, S = list(order[:4]), list(order[4:8])
    unigram = np.ones(16)
    unigram[P], unigram[S] = 3.0, 2.0
    preferred = np.zeros((16, 16), dtype=bool)
    for i in range(4):
        for a, b in ((P[i], P[(i + 1) % 4]), (P[i], P[i]), (S[i], S[i]), (P[i], S[i]), (S[i], P[i])):
            preferred[a, b] = True
    motif_w = np.array([1 + 0.9 * sum(c in P for c in m) + 0.5 * sum(c in S for c in m) for m in SPEC_MOTIFS])
    return unigram, preferred, motif_w


def expected_statistics(order) -> tuple[np.ndarray, np.ndarray]:
    """Long-block letter frequencies f (16,) and adjacent-pair frequencies f2 (16, 16) implied by
    the specification, computed exactly (no sampling) from the renewal chain over the previous
    letter: each step inserts a motif (prob 0.3) or takes one Markov step (weight unigram x 4 on
    preferred bigrams); afterwards every letter flips with prob 0.03 to one of the 15 others."""
    motif_prob, flip_prob = 0.3, 0.03
    unigram, preferred, motif_w = spec_style(order)
    W = unigram[None] * np.where(preferred, 1 + 3.0, 1.0)
    q = W / W.sum(1, keepdims=True)  # Markov step from each previous letter
    mp = motif_w / motif_w.sum()
    trans, emit = (1 - motif_prob) * q, (1 - motif_prob) * q  # next state / letters emitted per step
    internal, first, letters = np.zeros((16, 16)), np.zeros(16), np.zeros(16)
    for m, p in zip(SPEC_MOTIFS, mp):
        trans[:, m[-1]] += motif_prob * p
        np.add.at(letters, m, p)
        np.add.at(internal, (m[:-1], m[1:]), p)
        first[m[0]] += p
    emit = emit + motif_prob * letters
    pairs = np.zeros((16, 16, 16))  # pairs[s, a, b]: pairs (a, b) emitted by a step from state s
    for s in range(16):
        pairs[s] = motif_prob * internal
        pairs[s, s] += motif_prob * first + (1 - motif_prob) * q[s]
    evals, evecs = np.linalg.eig(trans.T)
    pi = np.real(evecs[:, np.argmin(abs(evals - 1))])
    pi /= pi.sum()
    step_len = (1 - motif_prob) + motif_prob * sum(len(m) * p for m, p in zip(SPEC_MOTIFS, mp))
    f, f2 = pi @ emit / step_len, np.einsum("s,sab->ab", pi, pairs) / step_len
    flip = np.full((16, 16), flip_prob / 15)
    np.fill_diagonal(flip, 1 - flip_prob)
    return f @ flip, flip.T @ f2 @ flip


def test_symbol_soup_style_statistics_follow_the_spec():
    """Sampled blocks against the exact statistics of the specification. 40 independent blocks of
    2500 letters per style; standard errors from the spread of the 40 block estimates (batch
    means), every test at level 1e-4: chi-square over the 16 letter frequencies and over the
    bigrams expected >= 5 times per block, z of the total preferred-bigram and motif-successor
    (a, a+1) frequencies."""
    stats = pytest.importorskip("scipy.stats")
    task = SymbolSoup()
    blocks, length = 40, 2500
    successor = np.eye(16, k=1, dtype=bool)
    z_max = stats.norm.ppf(1 - 0.5e-4)

    def z(samples: np.ndarray, expected: np.ndarray) -> np.ndarray:
        return (samples.mean(0) - expected) / (samples.std(0, ddof=1) / np.sqrt(blocks))

    for style in task.left_styles + task.right_styles:
        rng = random.Random(0)
        uni, bi = [], []
        for _ in range(blocks):
            block = np.array(style.block(length, rng))
            uni.append(np.bincount(block, minlength=16) / length)
            bi.append(np.bincount(block[:-1] * 16 + block[1:], minlength=256).reshape(16, 16) / (length - 1))
        uni, bi = np.array(uni), np.array(bi)
        f, f2 = expected_statistics(style.order)
        preferred = spec_style(style.order)[1]
        frequent = f2 * length >= 5
        assert (z(uni, f) ** 2).sum() <= stats.chi2.ppf(1 - 1e-4, 16)
        assert (z(bi[:, frequent], f2[frequent]) ** 2).sum() <= stats.chi2.ppf(1 - 1e-4, frequent.sum())
        assert abs(z(bi[:, preferred].sum(1), f2[preferred].sum())) <= z_max
        assert abs(z(bi[:, successor].sum(1), f2[successor].sum())) <= z_max
        # qualitative: primaries > secondaries > others; preferred bigrams more over-represented
        # than the others (both outside the motif successors)
        e1, e2 = uni.mean(0), bi.mean(0)
        P, S, O = style.order[:4], style.order[4:8], style.order[8:]
        assert e1[list(P)].mean() > e1[list(S)].mean() > e1[list(O)].mean()
        lift = e2 / np.outer(e1, e1)
        assert lift[preferred & ~successor].mean() > lift[~preferred & ~successor].mean()


def test_symbol_soup_examples_carry_their_class_styles():
    """Each stylized block of an example of class (l, r) is best explained, among the 9 styles'
    bigram models, by left style l or right style r: far more often than the chance rate 2/9."""
    task = SymbolSoup(num_train=400)
    styles = task.left_styles + task.right_styles
    models = []
    for f, f2 in (expected_statistics(style.order) for style in styles):
        models.append((np.log(f), np.log(f2 / f2.sum(1, keepdims=True))))
    hits = total = 0
    for i in range(400):
        ex = task.split("train")[i]
        left, right = divmod(int(ex["label"]), 5)
        blocks = parse(task, ex["tokens"])
        for block in map(np.array, (blocks[1], blocks[3])):
            if len(block) < 30:
                continue
            loglik = [lf[block[0]] + lf2[block[:-1], block[1:]].sum() for lf, lf2 in models]
            hits += int(np.argmax(loglik)) in (left, 4 + right)
            total += 1
    assert total > 300 and hits / total > 3 * 2 / 9


def test_symbol_soup_rejects_bad_bounds():
    with pytest.raises(ValueError, match="min_tokens"):
        SymbolSoup(min_tokens=30, max_tokens=20)
