"""Reference scores: the exact Bayes-optimal SymbolSoup classifier (a proper distribution over
blocks, equal to a scalar recursion written from docs/tasks.md, matching the generator's own
frequencies, calibrated), the cheaper SymbolSoup baselines, the recall shortcuts on hand-built and
generated examples, the Diffuse MQAR look-alike layout, and tools/ceilings.py."""

from __future__ import annotations

import itertools
import math
import random
import runpy
from functools import lru_cache

import numpy as np
import pytest
import torch

from tests.test_symbol_soup import SPEC_MOTIFS, spec_style
from zoo.tasks import MQAR, DiffuseMQAR, SymbolSoup, TextLM
from zoo.tasks.recall_shortcuts import SHORTCUTS, SOLUTION, diffuse_mqar_predictions, mqar_predictions
from zoo.tasks.reference import references
from zoo.tasks.symbol_soup_baselines import BASELINES
from zoo.tasks.symbol_soup_bayes import block_log_likelihood, class_log_posterior, log_posterior, stylized_blocks

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TASK = SymbolSoup(min_tokens=100, max_tokens=150, num_test=400)
STYLES = TASK.left_styles + TASK.right_styles


def all_blocks(n: int) -> list[np.ndarray]:
    return [np.array(c) for c in itertools.product(range(16), repeat=n)]


# ----------------------------------------------------------------------------- exact block probability


def spec_block_probability(y: list[int], order) -> float:
    """P(style generates exactly y) by a backward recursion over the generator's choices, written
    from docs/tasks.md: from a boundary with r letters left, a motif (prob 0.3 if r >= 3; by weight
    among those of length <= min(r, 5)) or one Markov step (unigram x 4 on preferred bigrams, the
    first letter by unigram); every letter then flips with prob 0.03 to one of the 15 others."""
    unigram, preferred, motif_w = spec_style(order)
    W = unigram[None] * np.where(preferred, 4.0, 1.0)
    step, first = W / W.sum(1, keepdims=True), unigram / unigram.sum()
    n = len(y)

    def emit(i: int, c: int) -> float:
        return 0.97 if y[i] == c else 0.03 / 15

    @lru_cache(maxsize=None)
    def rest(i: int, prev: int | None) -> float:
        if i == n:
            return 1.0
        room, total = n - i, 0.0
        p_motif = 0.3 if room >= 3 else 0.0
        if p_motif:
            fit = [(m, w) for m, w in zip(SPEC_MOTIFS, motif_w) if len(m) <= min(room, 5)]
            norm = sum(w for _, w in fit)
            for m, w in fit:
                total += p_motif * w / norm * math.prod(emit(i + k, c) for k, c in enumerate(m)) * rest(i + len(m), m[-1])
        q = first if prev is None else step[prev]
        total += (1 - p_motif) * sum(q[c] * emit(i, c) * rest(i + 1, c) for c in range(16))
        return total

    return rest(0, None)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_block_probabilities_sum_to_one(n):
    total = block_log_likelihood(all_blocks(n), STYLES).exp().sum(0)
    assert torch.allclose(total, torch.ones(len(STYLES), dtype=torch.float64), rtol=0, atol=1e-12), total


def test_block_probabilities_sum_to_one_at_four_letters():
    total = block_log_likelihood(all_blocks(4), [STYLES[-1]]).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-12)


def test_block_probability_equals_the_spec_recursion():
    """Random letters and generated blocks, 1 to 11 letters (every motif room: 3, 4 and >= 5)."""
    rng = random.Random(0)
    blocks = [np.array([rng.randrange(16) for _ in range(n)]) for n in range(1, 12)]
    blocks += [np.array(STYLES[s].block(n, rng)) for s, n in ((0, 5), (3, 7), (4, 9), (8, 11), (6, 6))]
    exact = block_log_likelihood(blocks, STYLES)
    for b, block in enumerate(blocks):
        for s in (0, 3, 4, 8):
            assert exact[b, s].item() == pytest.approx(math.log(spec_block_probability(block.tolist(), STYLES[s].order)),
                                                       rel=1e-10)


def test_block_probability_matches_the_generator_frequencies():
    """100,000 five-letter blocks from the generator (every motif can start the block): the 60 most
    likely sequences and the rest, chi-square at level 1e-4 against the exact probabilities."""
    stats = pytest.importorskip("scipy.stats")
    style, rng, n = STYLES[2], random.Random(1), 100_000
    counts: dict[tuple, int] = {}
    for _ in range(n):
        key = tuple(style.block(5, rng))
        counts[key] = counts.get(key, 0) + 1
    top = sorted(counts, key=counts.get, reverse=True)[:60]
    p = block_log_likelihood([np.array(k) for k in top], [style]).exp()[:, 0].numpy()
    observed = np.array([counts[k] for k in top] + [n - sum(counts[k] for k in top)])
    expected = np.append(p, 1 - p.sum()) * n
    assert expected.min() >= 5
    assert ((observed - expected) ** 2 / expected).sum() <= stats.chi2.ppf(1 - 1e-4, len(observed) - 1)


# ----------------------------------------------------------------------------- posterior and calibration


def test_blocks_are_read_from_the_separators():
    ex = TASK.split("test")[0]
    text = TASK.tokenizer.decode(ex["tokens"])
    first = text.split("<sep1>\n")[1].split("\n<sep2>")[0]
    b0, b1 = stylized_blocks(ex["tokens"])
    assert "".join("abcdefghijklmnop"[c] for c in b0) == first.replace(" ", "") and len(b1) > 0
    with pytest.raises(ValueError, match="<sep1>"):
        stylized_blocks(ex["tokens"][:5])


def test_posterior_is_a_distribution_symmetric_in_the_block_order():
    ll = torch.randn(6, 9, dtype=torch.float64) * 5
    other = torch.randn(6, 9, dtype=torch.float64) * 5
    post = class_log_posterior(ll, other)
    assert torch.allclose(post.exp().sum(-1), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(post, class_log_posterior(other, ll))
    # class 5 l + r pairs left style l (index l) with right style r (index 4 + r)
    k = 5 * 2 + 3
    joint = torch.logaddexp(ll[:, 2] + other[:, 7], ll[:, 7] + other[:, 2])
    assert torch.allclose(post[:, k] - post[:, 0], joint - torch.logaddexp(ll[:, 0] + other[:, 4], ll[:, 4] + other[:, 0]))


@pytest.fixture(scope="module")
def examples():
    exs = [TASK.split("test")[i] for i in range(400)]
    return [e["tokens"] for e in exs], torch.stack([e["label"] for e in exs])


def test_bayes_classifier_is_calibrated(examples):
    """Its predicted accuracy (mean max posterior) agrees with its realised accuracy: the paired
    difference is within 4 standard errors of 0."""
    tokens, labels = examples
    post = log_posterior(tokens, STYLES).exp()
    gap = (post.argmax(-1) == labels).double() - post.max(-1).values
    assert abs(gap.mean()) <= 4 * gap.std() / math.sqrt(len(gap)), (gap.mean(), gap.std())
    # and per confidence bin: the confident predictions are right more often
    confident = post.max(-1).values > 0.8
    assert (post.argmax(-1) == labels)[confident].double().mean() > 0.8 > (post.argmax(-1) == labels)[~confident].double().mean()


def test_bayes_classifier_beats_every_baseline_in_log_likelihood(examples):
    """The exact posterior gives the true class a higher mean log probability than each cheaper
    model (a proper scoring rule: the Bayes posterior maximises it in expectation)."""
    tokens, labels = examples
    def score(post):
        return post[torch.arange(len(labels)), labels].mean().item()

    bayes = score(log_posterior(tokens, STYLES))
    for name, model in BASELINES.items():
        assert bayes > score(log_posterior(tokens, STYLES, model)), name


# ----------------------------------------------------------------------------- cheaper baselines


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_block_models_are_distributions(name):
    for n in (1, 2, 3):
        total = BASELINES[name](all_blocks(n), STYLES).exp().sum(0)
        assert torch.allclose(total, torch.ones(len(STYLES), dtype=torch.float64), atol=1e-12), (n, total)


def test_baselines_known_values():
    style = STYLES[0]
    P, S = style.order[:4], style.order[4:8]
    u = np.array(style.unigram) / sum(style.unigram)
    flipped = u * 0.97 + (1 - u) * 0.03 / 15
    block = np.array([P[0], P[1], S[0]])
    assert BASELINES["unigram"]([block], [style])[0, 0].item() == pytest.approx(np.log(flipped[block]).sum())
    # true bigram: P0 -> P1 is preferred (weight 3 x 4 = 12), P1 -> S0 is not (2)
    w = np.array(style.markov_weights)
    step = (w[:16] / w[:16].sum(1, keepdims=True)) @ (np.eye(16) * (0.97 - 0.002) + 0.002)
    first = (w[16] / w[16].sum()) @ (np.eye(16) * (0.97 - 0.002) + 0.002)
    expected = np.log(first[P[0]]) + np.log(step[P[0], P[1]]) + np.log(step[P[1], S[0]])
    assert BASELINES["true bigram"]([block], [style])[0, 0].item() == pytest.approx(expected)


def test_baselines_classify_between_chance_and_the_ceiling(examples):
    tokens, labels = examples
    ceiling = log_posterior(tokens, STYLES).exp().max(-1).values.mean().item()
    accs = {name: (log_posterior(tokens, STYLES, model).argmax(-1) == labels).double().mean().item()
            for name, model in BASELINES.items()}
    se = math.sqrt(0.25 / len(labels))
    assert all(0.05 + 4 * se < a < ceiling + 4 * se for a in accs.values()), (accs, ceiling)
    assert accs["unigram"] < accs["fitted bigram"]  # bigrams carry more of the style


# ----------------------------------------------------------------------------- recall shortcuts


def hand_example(rows: list[list[int]], query_rows: list[int], w: int = 3) -> dict:
    tokens = torch.tensor([t for r in rows for t in r])
    targets = torch.full_like(tokens, -100)
    for q in query_rows:
        targets[q * w + w - 2] = rows[q][-1]
    return {"tokens": tokens, "targets": targets}


def test_diffuse_mqar_shortcuts_on_a_hand_built_example():
    """Keys over 1..9, values 10..: key (1, 2) -> 10 is asked at the end."""
    task = DiffuseMQAR(num_pairs=2, num_queries=1, key_vocab_size=9, value_vocab_size=9, lag_range=(3, 30))
    rows = [[3, 2, 13],   # same last token, other prefix (before the memory)
            [1, 2, 10],   # the memory pair
            [1, 4, 11],   # same prefix, other last token
            [5, 6, 12],
            [1, 2, 10]]   # the query
    pred = {k: v.tolist() for k, v in diffuse_mqar_predictions(task, hand_example(rows, [4])).items()}
    assert pred == {"first prefix match": [10], "last prefix match": [11], "first last-token match": [13],
                    "most recent key token": [10], SOLUTION: [10]}
    rows[3] = [7, 2, 14]  # a later row ending in the query's last token fools the one-token induction
    pred = diffuse_mqar_predictions(task, hand_example(rows, [4]))
    assert pred["most recent key token"].tolist() == [14] and pred[SOLUTION].tolist() == [10]


def test_mqar_shortcuts_on_a_hand_built_example():
    """Memory 1 -> 9, 2 -> 10; key 2 asked at step 4, key 1 at step 8, after a noise 1 followed by 11."""
    task = MQAR(vocab_size=16, seq_len=16, num_pairs=2)
    tokens = torch.tensor([1, 9, 2, 10, 2, 1, 11, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    targets = torch.full_like(tokens, -100)
    targets[4], targets[8] = 10, 9
    pred = {k: v.tolist() for k, v in mqar_predictions(task, {"tokens": tokens, "targets": targets}).items()}
    assert pred == {SOLUTION: [10, 9], "first prefix match": [9, 9], "last prefix match": [10, 10],
                    "most recent key token": [10, 11]}  # one-token keys: no separate last-token rule


@pytest.mark.parametrize("front", [0, 1])
def test_recall_references_on_generated_data(front):
    task = DiffuseMQAR(num_pairs=8, num_queries=4, lag_range=(12, 96), front_distractors=front, num_test=200)
    refs = references(task, "test")
    assert refs.chance == 1 / 64 and refs.ceiling["accuracy"].value == 1.0 and set(refs.baselines) == set(SHORTCUTS)
    assert {k for k in refs.ceiling if k.startswith("accuracy_lag_")} == {
        f"accuracy_lag_{lo}_{hi}" for lo, hi in ((12, 96), (96, 192), (192, 288), (288, 384))}
    name, best = refs.best_shortcut()
    if front == 0:  # the paper's layout: matching the prefix alone recalls most values
        assert name in ("first prefix match", "first last-token match") and best.value > 0.85
    else:  # look-alikes in the memory: a partial match finds the memory pair about half the time
        assert 0.3 < best.value < 0.6
    assert refs.fraction(0.5) == 0.5


def test_mqar_and_text_references():
    refs = references(MQAR(num_test=50), "test")
    assert refs.chance == 1 / 4096 and refs.baselines["first prefix match"]["accuracy"].value == pytest.approx(1 / 16)
    assert 0.9 < refs.best_shortcut()[1].value <= 1.0  # one-token keys: induction is (nearly) the solution
    assert references(TextLM(seq_len=64), "test") is None


# ----------------------------------------------------------------------------- the look-alike layout


def test_front_distractors_layout():
    c, P, Q = 1, 8, 4
    task = DiffuseMQAR(num_pairs=P, num_queries=Q, lag_range=(12, 96), front_distractors=c)
    F = P * (1 + 2 * c)
    assert task.seq_len == task.w * (F + 384 // task.w)  # the longest test lag
    for i in range(50):
        ex = task.split("train")[i]
        rows = ex["tokens"].view(-1, task.w).tolist()
        assert len(ex["tokens"]) <= task.seq_len
        queries = rows[len(rows) - Q:]
        scored = (ex["targets"] != -100).nonzero().flatten().tolist()
        keys = {tuple(q[:-1]): q[-1] for q in queries}
        block = rows[:F]  # the memory block: every memory pair once, among its look-alikes
        assert all(sum(tuple(r[:-1]) == key for r in block) == 1 for key in keys)
        for j, pos in enumerate(scored):
            key = tuple(queries[j][:-1])
            row = next(n for n, r in enumerate(block) if tuple(r[:-1]) == key)
            assert ex["lag"][pos] == (len(rows) - Q + j - row) * task.w and 12 <= ex["lag"][pos] <= 96
            assert ex["targets"][pos] == block[row][-1]
    with pytest.raises(ValueError, match="front_distractors"):
        DiffuseMQAR(num_pairs=2, num_queries=2, lag_range=(3, 18), front_distractors=1)
    with pytest.raises(ValueError, match="key_len >= 2"):
        DiffuseMQAR(key_len=1, front_distractors=1)


def test_front_distractors_are_look_alikes_of_every_memory_key():
    task = DiffuseMQAR(num_pairs=6, num_queries=6, key_len=3, key_vocab_size=12, lag_range=(20, 200), front_distractors=2)
    for i in range(20):
        ex = task.split("test")[i]
        rows = ex["tokens"].view(-1, task.w).tolist()
        memory = {tuple(q[:-1]) for q in rows[len(rows) - task.Q:]}  # all 6 pairs are asked
        block = [tuple(r[:-1]) for r in rows[: task.F]]
        assert task.F == 6 * 5 and all(block.count(k) == 1 for k in memory)
        for key in memory:
            same_prefix = [k for k in block if k not in memory and k[:-1] == key[:-1]]
            same_last = [k for k in block if k not in memory and k[-1] == key[-1] and k[:-1] != key[:-1]]
            assert len(same_prefix) >= 2 and len(same_last) >= 2


# ----------------------------------------------------------------------------- the tool


def test_ceilings_tool(tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "tools" / "ceilings.py"))["main"]
    rows = main(["--task", "symbol_soup", "--lengths", "100-150", "200-300", "--examples", "60",
                 "--json", str(tmp_path / "soup.json")])
    out = capsys.readouterr().out
    assert [label for label, _, _ in rows] == ["100-150 tokens", "200-300 tokens"]
    for label, refs, _ in rows:
        row = next(line for line in out.splitlines() if line.startswith(f"| {label} |"))
        assert f"| {refs.ceiling['accuracy']} |" in row and "| 0.05 |" in row
    # longer sequences carry more evidence
    assert rows[1][1].ceiling["accuracy"].value > rows[0][1].ceiling["accuracy"].value
    assert __import__("json").loads((tmp_path / "soup.json").read_text())[0]["ceiling_name"] == "Bayes-optimal"
    rows = main(["--task", "diffuse_mqar", "--front_distractors", "0", "1", "--examples", "40", "--set", "num_pairs=8",
                 "--set", "num_queries=4", "--set", "lag_range=(12, 96)"])
    assert [r[1].best_shortcut()[1].value > 0.8 for r in rows] == [True, False]
    rows = main(["--gin_file", "train/tasks/symbol_soup.gin", "--gin_param", "SymbolSoup.min_tokens = 100",
                 "--gin_param", "SymbolSoup.max_tokens = 150", "--examples", "20"])
    assert rows[0][1].task == "SymbolSoup 100-150 tokens"
    with pytest.raises(SystemExit):
        main(["--task", "text_lm", "--examples", "4"])
