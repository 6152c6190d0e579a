"""SymbolSoup: the paper's long-range 20-class classification task (docs/tasks.md).

An example hides two short "stylized" blocks of letters among three blocks of uniform noise; the
class is the pair (left style, right style) of the two blocks, 4 x 5 = 20 classes, read out at
the final <label> token. Styles differ only in letter and bigram statistics and in which motifs
they favour, so a model must pool evidence across the sequence.

Style families. Each family has one `random.Random(seed)` (123 for the 4 left styles, 456 for the
5 right styles); style s of the family is built from the s-th successive `rng.shuffle` of the
list of letters "a".."p" (style 0 from the first shuffle, style 1 from the second, ...).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import Tensor

from zoo.tasks.base import IGNORE_INDEX, Task, check_positive_int, example_random, seed_sequence

LETTERS = "abcdefghijklmnop"
NUM_LETTERS = len(LETTERS)
NUM_LEFT, NUM_RIGHT = 4, 5
NUM_CLASSES = NUM_LEFT * NUM_RIGHT
# Fixed by the specification.
PRIMARY_WEIGHT, SECONDARY_WEIGHT, OTHER_WEIGHT = 3.0, 2.0, 1.0
BIGRAM_BONUS = 3.0  # a preferred bigram multiplies the Markov weight by (1 + BIGRAM_BONUS)
MOTIF_PROB = 0.3
FLIP_PROB = 0.03
MOTIFS: tuple[tuple[int, ...], ...] = tuple(
    tuple(range(start, start + length)) for length in (3, 4, 5) for start in range(NUM_LETTERS - length + 1)
)  # 14 + 13 + 12 = 39 contiguous runs of "abcdefghijklmnop", as letter indices
SPECIALS = ("<pad>", "<bos>", "<sep1>", "<sep2>", "<sep>", "<label>", "<eos>", "[MASK]")
EXTRA_TOKENS = 13  # an example with M letters has 2M + 13 tokens


class SymbolSoupTokenizer:
    """Each special is one token; every other character (a..p, space, newline) is one token.

    Ids: the specials in SPECIALS order (<pad> = 0, never produced by the generator), then
    "a".."p", then " " and "\\n"; 26 tokens.
    """

    def __init__(self):
        self.vocab: list[str] = [*SPECIALS, *LETTERS, " ", "\n"]
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self._special_re.split(text):
            if piece in self.ids and len(piece) > 1:
                ids.append(self.ids[piece])
                continue
            for ch in piece:
                if ch not in self.ids:
                    raise ValueError(f"character {ch!r} is not in the SymbolSoup vocabulary")
                ids.append(self.ids[ch])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


class Style:
    """Letter statistics of one style, from a shuffled order of the 16 letters (indices 0..15).

    primaries = order[:4] (unigram weight 3), secondaries = order[4:8] (weight 2), others weight 1.
    Preferred bigrams (prev, next): P_i -> P_{i+1 mod 4}, P_i -> P_i, S_i -> S_i, P_i <-> S_i.
    Motif weight: 1 + 0.9 * #primary letters + 0.5 * #secondary letters.
    """

    def __init__(self, order: Sequence[int]):
        if sorted(order) != list(range(NUM_LETTERS)):
            raise ValueError(f"order must be a permutation of 0..15; got {list(order)}")
        self.order = tuple(order)
        self.primaries, self.secondaries = self.order[:4], self.order[4:8]
        self.unigram = [OTHER_WEIGHT] * NUM_LETTERS
        for p in self.primaries:
            self.unigram[p] = PRIMARY_WEIGHT
        for s in self.secondaries:
            self.unigram[s] = SECONDARY_WEIGHT
        P, S = self.primaries, self.secondaries
        self.preferred = frozenset(
            [(P[i], P[(i + 1) % 4]) for i in range(4)]
            + [(P[i], P[i]) for i in range(4)]
            + [(S[i], S[i]) for i in range(4)]
            + [(P[i], S[i]) for i in range(4)]
            + [(S[i], P[i]) for i in range(4)]
        )
        self.motif_weights = [
            1.0 + 0.9 * sum(c in P for c in m) + 0.5 * sum(c in S for c in m) for m in MOTIFS
        ]
        # Sampling tables: Markov step from each previous letter (index 16: no previous letter),
        # motifs that fit in 3, 4 or >= 5 remaining letters.
        self.markov_weights = [
            [self.unigram[b] * (1.0 + BIGRAM_BONUS * ((a, b) in self.preferred)) for b in range(NUM_LETTERS)]
            for a in range(NUM_LETTERS)
        ] + [list(self.unigram)]
        self._markov_cum = [list(accumulate(w)) for w in self.markov_weights]
        self._motifs_fitting = {}
        for room in (3, 4, 5):
            fit = [i for i, m in enumerate(MOTIFS) if len(m) <= room]
            self._motifs_fitting[room] = ([MOTIFS[i] for i in fit], list(accumulate(self.motif_weights[i] for i in fit)))

    def block(self, n: int, rng: random.Random) -> list[int]:
        """A stylized block of n letters (indices 0..15)."""
        out: list[int] = []
        letters = range(NUM_LETTERS)
        while len(out) < n:
            remaining = n - len(out)
            if remaining >= 3 and rng.random() < MOTIF_PROB:
                motifs, cum = self._motifs_fitting[min(remaining, 5)]
                out.extend(rng.choices(motifs, cum_weights=cum)[0])  # fits, so never longer than n
            else:
                prev = out[-1] if out else NUM_LETTERS
                out.append(rng.choices(letters, cum_weights=self._markov_cum[prev])[0])
        for i, c in enumerate(out):
            if rng.random() < FLIP_PROB:
                other = rng.randrange(NUM_LETTERS - 1)
                out[i] = other + (other >= c)  # uniform over the 15 other letters
        return out


def style_family(seed: int, count: int) -> list[Style]:
    """`count` styles from successive shuffles of "a".."p" by one random.Random(seed)."""
    rng = random.Random(seed)
    styles = []
    for _ in range(count):
        letters = list(LETTERS)
        rng.shuffle(letters)
        styles.append(Style([LETTERS.index(c) for c in letters]))
    return styles


class SymbolSoup(Task):
    """Long-range 20-class classification (see module docstring and docs/tasks.md).

    Args:
        min_tokens, max_tokens: bounds on the example length (an example has 2M + 13 tokens).
        num_train, num_validation, num_test: examples per split (balanced over the 20 classes
            up to the remainder of n / 20).
        seed: seed of the examples; the splits use independent streams derived from it.
        left_seed, right_seed: seeds of the left (4) and right (5) style families.
    """

    name = "symbol_soup"

    def __init__(
        self,
        min_tokens: int = 400,
        max_tokens: int = 600,
        num_train: int = 20000,
        num_validation: int = 2000,
        num_test: int = 2000,
        seed: int = 0,
        left_seed: int = 123,
        right_seed: int = 456,
    ):
        check_positive_int("min_tokens", min_tokens)
        check_positive_int("max_tokens", max_tokens)
        self.m_min = max(5, math.ceil((min_tokens - EXTRA_TOKENS) / 2))
        self.m_max = max(5, (max_tokens - EXTRA_TOKENS) // 2)
        if self.m_min > self.m_max:
            raise ValueError(
                f"min_tokens={min_tokens}, max_tokens={max_tokens} admit no length 2M + 13 with M >= 5; "
                "widen the range"
            )
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.set_splits(num_train, num_validation, num_test, seed)
        self.tokenizer = SymbolSoupTokenizer()
        self.left_styles = style_family(left_seed, NUM_LEFT)
        self.right_styles = style_family(right_seed, NUM_RIGHT)
        self.kind = "classification"
        self.num_classes = NUM_CLASSES
        self.vocab_size = len(self.tokenizer)
        self.seq_len = 2 * self.m_max + EXTRA_TOKENS
        self.pad_id = self.tokenizer.ids["<pad>"]
        self._labels: dict[str, list[int]] = {}

    def labels(self, split: str) -> list[int]:
        """Class of every example of a split: each class n // 20 or n // 20 + 1 times, in a
        seeded random order."""
        if split not in self._labels:
            n = self.num_examples(split)
            rng = random.Random(int(seed_sequence(self.seed, split, 1).generate_state(1)[0]))
            labels = [i % NUM_CLASSES for i in range(n)]
            rng.shuffle(labels)
            self._labels[split] = labels
        return self._labels[split]

    def text(self, label: int, rng: random.Random) -> str:
        """The text of one example of class `label` = 5 * left + right."""
        left, right = divmod(label, NUM_RIGHT)
        M = rng.randint(self.m_min, self.m_max)
        n_lo = max(3, math.floor(0.3 * M))
        N = min(rng.randint(n_lo, max(n_lo, math.floor(0.6 * M))), M - 2)
        n0 = rng.randint(1, N - 2)
        n1 = rng.randint(1, N - n0 - 1)
        n2 = N - n0 - n1
        n_left = rng.randint(1, M - N - 1)
        blocks = [self.left_styles[left].block(n_left, rng), self.right_styles[right].block(M - N - n_left, rng)]
        if rng.random() < 0.5:
            blocks.reverse()
        noise = [[rng.randrange(NUM_LETTERS) for _ in range(n)] for n in (n0, n1, n2)]
        b, z = [" ".join(LETTERS[c] for c in blk) for blk in blocks], [" ".join(LETTERS[c] for c in blk) for blk in noise]
        return (
            f"<bos>\n{z[0]}\n<sep1>\n{b[0]}\n<sep2>\n{z[1]}\n<sep1>\n{b[1]}\n<sep2>\n{z[2]}\n<sep> <label>"
        )

    def example(self, split: str, index: int) -> dict[str, Tensor]:
        label = self.labels(split)[index]
        tokens = torch.tensor(self.tokenizer.encode(self.text(label, example_random(self.seed, split, index))))
        T = len(tokens)
        targets = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        targets[T - 1] = label
        return {"tokens": tokens, "targets": targets, "label": torch.tensor(label), "position": torch.tensor(T - 1)}
