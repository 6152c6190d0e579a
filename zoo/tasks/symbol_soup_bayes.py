"""The exact Bayes-optimal SymbolSoup classifier, from the generator's own parameters.

What the posterior depends on. Given the tokens, the separators show the five blocks. The lengths
(M, N, the noise split, the stylized split) are drawn independently of the class, and the split
of the stylized letters, n_left uniform in [1, M - N - 1], gives the observed length pair the same
probability in either order; noise letters are uniform. So with a uniform class prior

    p(l, r | x) ∝ 1/2 [P_l(b0) P_r(b1) + P_r(b0) P_l(b1)]

where b0, b1 are the two stylized blocks in text order and P_s(y) is the probability that style s
generates the letters y for a block of n = len(y) letters, summed over every random choice the
generator makes inside a block:

* a clean sequence c: at each boundary (n - i letters left) a motif with probability 0.3 if
  n - i >= 3, chosen by weight among the motifs of length <= min(n - i, 5); otherwise one Markov
  step from the previous clean letter (the first from the unigram weights);
* then every letter independently: y_i = c_i with probability 0.97, else one of the 15 others.

`block_log_likelihood` computes log P_s(y) exactly with a forward recursion over boundaries i
(the clean sequence is complete up to letter i, its last clean letter is a):

    alpha[i, a] = p_markov(i-1) sum_a' alpha[i-1, a'] T[a', a] e(y_{i-1} | a)
                + sum_{L=3..5} mass[i-L] 0.3 sum_{motifs m of length L ending in a} w_m / W(room) prod_k e(y_{i-L+k} | m_k)

with mass[j] = sum_a alpha[j, a] (mass[0] = 1; from boundary 0 the Markov step uses the unigram
row of T), p_markov(j) = 0.7 if n - j >= 3 else 1, W(room) the total weight of the motifs that fit
min(n - j, 5), and e(y | c) the flip channel. P_s(y) = mass[n]. Vectorised over blocks and the 9
styles, one step per letter; alpha is renormalised at every boundary and its log scale kept in
float64, so blocks of thousands of letters neither underflow nor lose precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from zoo.tasks.symbol_soup import (
    FLIP_PROB,
    LETTERS,
    MOTIF_PROB,
    MOTIFS,
    NUM_LEFT,
    NUM_LETTERS,
    NUM_RIGHT,
    Style,
    SymbolSoupTokenizer,
)

_TOKENIZER = SymbolSoupTokenizer()
_FIRST_LETTER_ID = _TOKENIZER.ids[LETTERS[0]]
_SEP1, _SEP2 = _TOKENIZER.ids["<sep1>"], _TOKENIZER.ids["<sep2>"]
MAX_MOTIF = max(map(len, MOTIFS))


def stylized_blocks(tokens: Sequence[int] | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The letters (indices 0..15) of the two stylized blocks of one SymbolSoup example, in text
    order: each lies between a <sep1> and the next <sep2>."""
    ids = np.asarray(tokens.tolist() if isinstance(tokens, Tensor) else tokens)
    opens, closes = np.flatnonzero(ids == _SEP1), np.flatnonzero(ids == _SEP2)
    if len(opens) != 2 or len(closes) != 2:
        raise ValueError(f"a SymbolSoup example has two <sep1> and two <sep2> tokens; got {len(opens)} and {len(closes)}")
    blocks = []
    for a, b in zip(opens, closes):
        span = ids[a + 1 : b]
        letters = span[(span >= _FIRST_LETTER_ID) & (span < _FIRST_LETTER_ID + NUM_LETTERS)] - _FIRST_LETTER_ID
        if len(letters) == 0:
            raise ValueError("a stylized block holds no letters")
        blocks.append(letters.astype(np.int64))
    return blocks[0], blocks[1]


def flip_channel() -> Tensor:
    """e[c, y] = P(observed y | clean c) (16, 16): 0.97 on the diagonal, 0.03 / 15 elsewhere."""
    e = torch.full((NUM_LETTERS, NUM_LETTERS), FLIP_PROB / (NUM_LETTERS - 1), dtype=torch.float64)
    return e.fill_diagonal_(1 - FLIP_PROB)


def markov_tables(styles: Sequence[Style]) -> Tensor:
    """(S, 17, 16) Markov step of each style: row a < 16 from previous letter a, row 16 the first letter."""
    w = torch.tensor([s.markov_weights for s in styles], dtype=torch.float64)
    return w / w.sum(-1, keepdim=True)


def padded(blocks: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Blocks -> letters (B, N) right-padded with 0, lengths (B,)."""
    lengths = torch.tensor([len(b) for b in blocks])
    if (lengths < 1).any():
        raise ValueError("every block needs at least one letter")
    letters = torch.zeros(len(blocks), int(lengths.max()), dtype=torch.long)
    for i, b in enumerate(blocks):
        letters[i, : len(b)] = torch.as_tensor(b)
    return letters, lengths


class _MotifTables:
    """Motif tables of S styles.

    pick (39, 6 * S * 16) and pick_slots: for a boundary with 3, 4 or >= 5 letters left (k = 1,
        2, 3) and the motifs of length L, column block pick_slots.index((L, k)) holds the
        probability that style s chooses motif m, placed at m's last letter c;
    letters (5 * 17, 39): one-hot of the letter at each of the 5 places of each motif (index 16
        past its end), so that a window of 5 log-emission rows (B, 5 * 17) @ letters = the log
        emission of every motif (B, 39).
    """

    def __init__(self, styles: Sequence[Style]):
        w = torch.tensor([s.motif_weights for s in styles], dtype=torch.float64)  # (S, 39)
        lengths = torch.tensor([len(m) for m in MOTIFS])
        last = torch.zeros(len(MOTIFS), NUM_LETTERS, dtype=torch.float64)
        last[torch.arange(len(MOTIFS)), torch.tensor([m[-1] for m in MOTIFS])] = 1
        self.pick_slots, pick = [], []
        for k, room in enumerate((3, 4, 5), start=1):
            fit = w * (lengths <= room)
            choice = fit / fit.sum(-1, keepdim=True)  # (S, 39)
            for L in range(3, room + 1):
                self.pick_slots.append((L, k))
                pick.append(torch.einsum("sm,mc->msc", choice, last * (lengths == L)[:, None]).flatten(1))
        self.pick = torch.cat(pick, 1)
        self.letters = torch.zeros(MAX_MOTIF, NUM_LETTERS + 1, len(MOTIFS), dtype=torch.float64)
        for i, m in enumerate(MOTIFS):
            for place in range(MAX_MOTIF):
                self.letters[place, m[place] if place < len(m) else NUM_LETTERS, i] = 1
        self.letters = self.letters.flatten(0, 1)


@torch.no_grad()
def block_log_likelihood(blocks: Sequence[np.ndarray], styles: Sequence[Style], chunk: int = 1024) -> Tensor:
    """Exact log P_s(block) (B, S) in nats: the probability that style s generates exactly these
    letters for a block of their length (see the module docstring)."""
    order = np.argsort([len(b) for b in blocks], kind="stable")  # similar lengths share a chunk
    out = torch.empty(len(blocks), len(styles), dtype=torch.float64)
    T, motifs, channel = markov_tables(styles), _MotifTables(styles), flip_channel()
    for start in range(0, len(blocks), chunk):
        idx = order[start : start + chunk]
        out[torch.as_tensor(idx)] = _forward(*padded([blocks[i] for i in idx]), T, motifs, channel)
    return out


def _forward(letters: Tensor, lengths: Tensor, T: Tensor, motifs: _MotifTables, channel: Tensor) -> Tensor:
    """letters (B, N), lengths (B,) -> log P_s (B, S). Scaled forward recursion: alpha[i] = A[i] exp(logc[i])
    with A[i] summing to 1 over the 16 letters."""
    B, N = letters.shape
    S = T.shape[0]
    # log e(y_i | c) (B, N + 5, 17): column 16 and the positions past the end are log 1 = 0
    log_emit = torch.zeros(B, N + MAX_MOTIF, NUM_LETTERS + 1, dtype=torch.float64)
    log_emit[:, :N, :NUM_LETTERS] = rearrange(channel.log()[:, letters], "c b n -> b n c")
    room = lengths[:, None] - torch.arange(N + 1)[None]  # (B, N + 1) letters left at each boundary
    p_markov = 1 - MOTIF_PROB * (room >= 3).double()  # (B, N + 1)
    room_kind = {k: (room.clamp(2, 5) - 2 == k).double() for k in (1, 2, 3)}  # 3, 4, >= 5 letters left
    A = torch.zeros(B, S, NUM_LETTERS, dtype=torch.float64)  # letters at the last boundary (boundary 0: unused)
    logc = [torch.zeros(B, S, dtype=torch.float64)]  # log scale of every boundary so far
    final = torch.zeros(B, S, dtype=torch.float64)
    picked: dict[int, dict[int, Tensor]] = {}  # boundary j -> motif length L -> (B, S, 16), the last 5 boundaries
    for i in range(1, N + 1):
        if i >= 3:  # the motifs that start at boundary j = i - 3 (their lengths 3, 4, 5 end at i, i + 1, i + 2)
            j = i - 3
            e_motif = (log_emit[:, j : j + MAX_MOTIF].flatten(1) @ motifs.letters).exp()  # (B, 39)
            by_slot = (e_motif @ motifs.pick).view(B, len(motifs.pick_slots), S, NUM_LETTERS)
            picked[j] = {L: 0.0 for L in (3, 4, 5)}
            for n, (L, k) in enumerate(motifs.pick_slots):
                picked[j][L] = picked[j][L] + room_kind[k][:, j, None, None] * by_slot[:, n]
            picked.pop(j - 3, None)
        prev = T[:, NUM_LETTERS][None] if i == 1 else torch.einsum("bsa,sac->bsc", A, T[:, :NUM_LETTERS])
        new = p_markov[:, i - 1, None, None] * prev * log_emit[:, i - 1, None, :NUM_LETTERS].exp()
        for L in (3, 4, 5):
            j = i - L
            if j < 0:
                break
            scale = torch.exp(logc[j] - logc[-1])  # mass at j relative to the scale of i - 1
            new = new + MOTIF_PROB * scale[..., None] * picked[j][L]
        total = new.sum(-1)
        A = new / total[..., None]
        logc.append(logc[-1] + total.log())
        done = lengths == i
        final[done] = logc[-1][done]
    return final


def class_log_posterior(first: Tensor, second: Tensor) -> Tensor:
    """log p(class | blocks) (B, 20) from the per-style log likelihoods (B, 9) of the two stylized
    blocks in text order (left styles first, then right styles); class = 5 * left + right, either
    block may be the left one (probability 1/2 each), uniform class prior."""
    left = torch.arange(NUM_LEFT).repeat_interleave(NUM_RIGHT)  # class k -> style indices
    right = NUM_LEFT + torch.arange(NUM_RIGHT).repeat(NUM_LEFT)
    joint = torch.logaddexp(first[:, left] + second[:, right], first[:, right] + second[:, left])
    return joint - torch.logsumexp(joint, -1, keepdim=True)


def log_posterior(examples: Sequence[Sequence[int] | Tensor], styles: Sequence[Style],
                  block_model=block_log_likelihood) -> Tensor:
    """log p(class | tokens) (B, 20) for SymbolSoup examples (token ids), under `block_model`
    (blocks, styles) -> (B, S) log likelihoods: by default the exact one, i.e. the Bayes posterior."""
    pairs = [stylized_blocks(t) for t in examples]
    loglik = block_model([b for pair in pairs for b in pair], styles)  # (2B, S)
    return class_log_posterior(loglik[0::2], loglik[1::2])
