"""generate(): reproducible sampling, greedy == argmax of repeated full forward passes, stop
tokens, top-k / top-p supports, batched prompts of different lengths == each prompt alone,
chunked prefill, scores, streaming, argument errors; tools/generate.py with and without a
checkpoint."""

from __future__ import annotations

import pytest
import torch

from tests.test_cache import MODELS, V, build_lm, skip_if_cannot_decode
from zoo import gin_config
from zoo.generate import filter_logits, generate

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def hybrid():
    return build_lm("hybrid")


@torch.no_grad()
def argmax_continuation(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without a cache: a full forward pass over the whole sequence per token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_argmax_of_full_forward_passes(name):
    model = build_lm(name)
    skip_if_cannot_decode(model, name)
    out = generate(model, PROMPTS, max_new_tokens=6, greedy=True)
    assert out == [argmax_continuation(model, p, 6) for p in PROMPTS]


@pytest.mark.parametrize("name", MODELS)
def test_batched_prompts_equal_each_prompt_alone(name):
    model = build_lm(name)
    skip_if_cannot_decode(model, name)
    batched = generate(model, PROMPTS, max_new_tokens=5, greedy=True, prefill_chunk=2)
    assert batched == [generate(model, [p], max_new_tokens=5, greedy=True)[0] for p in PROMPTS]


def test_seed_makes_sampling_reproducible(hybrid):
    kwargs = dict(max_new_tokens=12, temperature=1.5)
    first = generate(hybrid, PROMPTS, seed=3, **kwargs)
    assert generate(hybrid, PROMPTS, seed=3, **kwargs) == first
    assert generate(hybrid, PROMPTS, seed=4, **kwargs) != first
    torch.manual_seed(11)
    unseeded = generate(hybrid, PROMPTS, **kwargs)
    torch.manual_seed(11)
    assert generate(hybrid, PROMPTS, **kwargs) == unseeded  # seed=None follows torch's global seed
    assert all(len(row) == 12 for row in first)


def test_pad_id_and_prefill_chunk_do_not_change_the_result(hybrid):
    reference = generate(hybrid, PROMPTS, max_new_tokens=8, seed=0)
    assert generate(hybrid, PROMPTS, max_new_tokens=8, seed=0, pad_id=V - 1, prefill_chunk=3) == reference


def test_stop_tokens_finish_each_row(hybrid):
    free = generate(hybrid, PROMPTS, max_new_tokens=10, greedy=True)
    stop = free[0][2]
    out = generate(hybrid, PROMPTS, max_new_tokens=10, greedy=True, stop_tokens=[stop])
    for row, full in zip(out, free):
        expected = full[:full.index(stop) + 1] if stop in full else full  # the stop token is kept
        assert row == expected
    assert len(out[0]) <= 3 and out[0][-1] == stop


def test_all_rows_stopping_ends_generation_early(hybrid):
    seen = []
    out = generate(hybrid, [[1, 2]], max_new_tokens=50, stop_tokens=range(V), seed=0,
                   stream=lambda row, token: seen.append((row, token)))
    assert len(out[0]) == 1 and seen == [(0, out[0][0])]


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.9, temperature=3.0)])
def test_top_k_1_and_tiny_top_p_equal_greedy(hybrid, kwargs):
    greedy = generate(hybrid, PROMPTS, max_new_tokens=6, greedy=True)
    assert generate(hybrid, PROMPTS, max_new_tokens=6, seed=0, **kwargs) == greedy


def first_token_samples(model, prompt: list[int], n: int, **kwargs) -> set[int]:
    return {row[0] for row in generate(model, [prompt] * n, max_new_tokens=1, seed=0, **kwargs)}


@torch.no_grad()
def test_top_k_and_top_p_restrict_the_support(hybrid):
    prompt = [5, 9, 2]
    logits = hybrid(torch.tensor([prompt]))[0, -1] / 3.0  # temperature 3 spreads the samples
    order = logits.argsort(descending=True).tolist()
    assert first_token_samples(hybrid, prompt, 400, temperature=3.0, top_k=4) == set(order[:4])
    probs = logits.softmax(-1)[order]
    nucleus = int((probs.cumsum(0) < 0.5).sum()) + 1  # smallest head of the ranking with mass >= 0.5
    assert nucleus >= 2
    assert first_token_samples(hybrid, prompt, 400, temperature=3.0, top_p=0.5) == set(order[:nucleus])
    assert len(first_token_samples(hybrid, prompt, 400, temperature=3.0)) > nucleus


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.4)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_p=0.41)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.95)) == [True, True, True, True]
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)


@torch.no_grad()
def test_scores_are_the_models_log_probabilities(hybrid):
    out, scores = generate(hybrid, PROMPTS[:2], max_new_tokens=4, seed=1, return_scores=True)
    for prompt, row, row_scores in zip(PROMPTS, out, scores):
        log_probs = hybrid(torch.tensor([prompt + row]))[0].log_softmax(-1)
        expected = [float(log_probs[len(prompt) - 1 + i, t]) for i, t in enumerate(row)]
        assert row_scores == pytest.approx(expected, abs=1e-10)


def test_stream_sees_every_token_in_order(hybrid):
    seen: list[list[int]] = [[] for _ in PROMPTS]
    out = generate(hybrid, PROMPTS, max_new_tokens=5, seed=0, stop_tokens=[7],
                   stream=lambda row, token: seen[row].append(token))
    assert seen == out


def test_works_in_float32():
    model = build_lm("hybrid").float()
    out = generate(model, PROMPTS, max_new_tokens=3, greedy=True)
    assert out == [argmax_continuation(model, p, 3) for p in PROMPTS]


@pytest.mark.parametrize("prompts,kwargs,match", [
    ([], {}, "prompts must be a non-empty list of token lists"),
    ([1, 2, 3], {}, r"prompts\[0\] is 1"),
    ([[1], []], {}, r"prompts\[1\] is empty"),
    ([[1, V]], {}, rf"prompts\[0\] has tokens outside \[0, vocab_size={V}\): \[{V}\]"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens must be a positive int; got max_new_tokens=0"),
    ([[1]], dict(temperature=0.0), "temperature must be > 0"),
    ([[1]], dict(top_k=0), "top_k must be a positive int or None; got top_k=0"),
    ([[1]], dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    ([[1]], dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    ([[1]], dict(prefill_chunk=0), "prefill_chunk must be a positive int or None"),
    ([[1]], dict(pad_id=V), rf"pad_id must lie in \[0, vocab_size={V}\)"),
])
def test_argument_errors(hybrid, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(hybrid, prompts, **{"max_new_tokens": 2, **kwargs})


def test_greedy_ignores_temperature(hybrid):
    assert (generate(hybrid, PROMPTS, max_new_tokens=3, greedy=True, temperature=0.0)
            == generate(hybrid, PROMPTS, max_new_tokens=3, greedy=True))


# ---------------------------------------------------------------------------- tools/generate.py

def test_tool_streams_from_random_weights(capsys):
    from tools.generate import main

    main(["--prompt", "Hello", "--max_new_tokens", "7", "--seed", "0", "--greedy"])
    out = capsys.readouterr().out
    gin_config.parse(["default.gin"])
    torch.manual_seed(0)  # --seed also seeds the random weights
    expected = generate(gin_config.build_model().eval(), [list(b"Hello")], max_new_tokens=7, greedy=True)[0]
    assert out == (b"Hello" + bytes(expected)).decode("utf-8", errors="replace") + "\n"


def test_tool_loads_a_checkpoint(tmp_path, capsys):
    from tools.generate import main
    from zoo.train import checkpoint

    gin_config.parse(["default.gin"])
    torch.manual_seed(5)
    model = gin_config.build_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    run = tmp_path / "run"
    folder = checkpoint.write(run / "checkpoints", 7, model.state_dict(), {"step": 7})
    (run / "config.gin").write_text(gin_config.config_str())
    expected = generate(model, [list(b"abc")], max_new_tokens=6, greedy=True)[0]

    for source in (run, folder / checkpoint.WEIGHTS):  # a run folder (its config.gin) or a weights file
        args = ["--checkpoint", str(source), "--prompt", "abc", "--max_new_tokens", "6", "--greedy", "--ids"]
        main(args if source == run else ["--gin_file=default.gin", *args])
        out = capsys.readouterr().out.split()
        assert [int(t) for t in out] == list(b"abc") + expected
