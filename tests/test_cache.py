"""StackCache: one decoding cache for any stack. For every registered mixer (tests/registry_mixers.py)
in a gated and a residual block, and a hybrid of Sessa, attention, Mamba-2 and sliding-window
attention, as float64 CausalLMs on random weights: token-by-token decoding, prefill + decoding and
chunked prefill equal the full forward pass to 1e-10, with left-padded batched prompts too (each
row equals its unpadded run); the cache's errors, reorder and sizes."""

from __future__ import annotations

import pytest
import torch

from blocks.gated_block import GatedBlock
from blocks.residual_block import ResidualBlock
from tests.registry_mixers import factory, names, skip_if_exempt
from zoo.cache import StackCache
from zoo.models import CausalLM
from zoo.stack import Stack

D, V = 32, 50
TOL = dict(rtol=1e-10, atol=1e-10)


def both_blocks(mixer: str) -> list:
    """Two layers of `mixer`: one in the paper's gated block, one in a pre-norm residual block."""
    return [lambda d: GatedBlock(d, factory(mixer)), lambda d: ResidualBlock(d, factory(mixer))]


LAYERS = {name: both_blocks(name) for name in names()}  # one block factory per layer
LAYERS["hybrid"] = [lambda d: GatedBlock(d, factory("sessa")), lambda d: GatedBlock(d, factory("attention")),
                    lambda d: GatedBlock(d, factory("mamba2")), lambda d: ResidualBlock(d, factory("sliding_window"))]
MODELS = list(LAYERS)


def build_lm(name: str, seed: int = 0) -> CausalLM:
    """A float64 CausalLM with random weights scaled so its outputs depend on the context (with the
    default small init, a tied head mostly predicts the input token)."""
    torch.manual_seed(seed)
    model = CausalLM(V, D, Stack(D, LAYERS[name])).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    return model


def skip_if_cannot_decode(model: CausalLM, name: str) -> None:
    for layer in model.stack.layers:
        skip_if_exempt(layer.mixer, name, "decode")


@pytest.fixture(scope="module", params=MODELS)
def model(request) -> CausalLM:
    model = build_lm(request.param)
    skip_if_cannot_decode(model, request.param)
    return model


def decode(model: CausalLM, tokens: torch.Tensor, sizes: list[int], seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Feed tokens through a fresh cache in pieces of the given sizes -> concatenated logits."""
    cache = StackCache.allocate(model, tokens.shape[0], tokens.shape[1])
    out, start = [], 0
    for n in sizes:
        piece = None if seq_idx is None else seq_idx[:, start:start + n]
        out.append(model(tokens[:, start:start + n], seq_idx=piece, cache=cache))
        start += n
    assert start == tokens.shape[1] == cache.length
    return torch.cat(out, dim=1)


def test_token_by_token_equals_forward(model):
    tokens = torch.randint(V, (2, 11))
    torch.testing.assert_close(decode(model, tokens, [1] * 11), model(tokens), **TOL)


@pytest.mark.parametrize("prefill", [1, 6])
def test_prefill_then_decoding_equals_forward(model, prefill):
    tokens = torch.randint(V, (2, 11))
    torch.testing.assert_close(decode(model, tokens, [prefill] + [1] * (11 - prefill)), model(tokens), **TOL)


@pytest.mark.parametrize("chunk", [2, 3, 4, 5])
def test_chunked_prefill_equals_forward(model, chunk):
    """A 10-token prompt in chunks (the last one shorter), then 3 decoding steps."""
    tokens = torch.randint(V, (2, 13))
    sizes = [chunk] * (10 // chunk) + ([10 % chunk] if 10 % chunk else []) + [1, 1, 1]
    torch.testing.assert_close(decode(model, tokens, sizes), model(tokens), **TOL)


def left_padded(prompts: list[torch.Tensor], pad_id: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), L), pad_id)
    seq_idx = torch.full((len(prompts), L), -1)
    for b, p in enumerate(prompts):
        tokens[b, L - len(p):] = p
        seq_idx[b, L - len(p):] = 0
    return tokens, seq_idx


@pytest.mark.parametrize("prefill_sizes", [None, [3, 3, 2]], ids=["one_pass", "chunks"])
def test_left_padded_batch_equals_each_row_alone(model, prefill_sizes):
    """Prompts of lengths 3, 8, 5, left-padded (pads: segment -1), then 3 new tokens per row."""
    prompts = [torch.randint(V, (n,)) for n in (3, 8, 5)]
    tokens, seq_idx = left_padded(prompts)
    new = torch.randint(V, (3, 3))
    alone = [model(torch.cat([p, n])[None])[0] for p, n in zip(prompts, new)]  # (len + 3, V) each

    full = model(torch.cat([tokens, new], dim=1), seq_idx=torch.cat([seq_idx, torch.zeros_like(new)], dim=1))
    sizes = (prefill_sizes or [8]) + [1, 1, 1]
    steps = decode(model, torch.cat([tokens, new], dim=1), sizes, torch.cat([seq_idx, torch.zeros_like(new)], dim=1))
    for b, expected in enumerate(alone):
        torch.testing.assert_close(full[b, 11 - len(expected):], expected, **TOL)
        torch.testing.assert_close(steps[b, 11 - len(expected):], expected, **TOL)


def test_stack_cache_without_a_model():
    stack = Stack(D, LAYERS["hybrid"]).double()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    cache = StackCache.allocate(stack, 2, 7)
    steps = torch.cat([stack(x[:, :4], cache=cache), stack(x[:, 4:], cache=cache)], dim=1)
    torch.testing.assert_close(steps, stack(x), **TOL)


# ---------------------------------------------------------------------------- errors

def test_cache_too_short_is_caught_before_any_layer_runs():
    model = build_lm("hybrid")
    tokens = torch.randint(V, (2, 6))
    cache = StackCache.allocate(model, 2, 5)
    model(tokens[:, :4], cache=cache)
    with pytest.raises(ValueError, match=r"cache too short: 2 new tokens requested but only 1 left "
                                         r"\(max_len=5, 4 already held\)"):
        model(tokens[:, 4:6], cache=cache)
    assert [s.length for s in cache.states] == [4] * 4  # untouched: the last token still fits and is exact
    torch.testing.assert_close(model(tokens[:, 4:5], cache=cache), model(tokens[:, :5])[:, 4:], **TOL)
    with pytest.raises(ValueError, match="cache too short: 1 new tokens requested but only 0 left"):
        model(tokens[:, 5:6], cache=cache)


def test_batch_mismatch_is_caught_before_any_layer_runs():
    model = build_lm("hybrid")
    cache = StackCache.allocate(model, 2, 8)
    with pytest.raises(ValueError, match="cache was allocated for batch_size=2 but the input has batch size 3"):
        model(torch.randint(V, (3, 4)), cache=cache)
    assert cache.length == 0 and all(s.length == 0 for s in cache.states)


def test_cache_argument_errors():
    model = build_lm("hybrid")
    with pytest.raises(TypeError, match="cache must be a StackCache"):
        model(torch.randint(V, (1, 3)), cache=model.stack.allocate_states(1, 3))
    with pytest.raises(ValueError, match="cache holds 2 layer states but the stack has 4 layers"):
        model(torch.randint(V, (1, 3)), cache=StackCache.allocate(build_lm("sessa"), 1, 3))
    with pytest.raises(ValueError, match="batch_size must be a positive int; got batch_size=0"):
        StackCache.allocate(model, 0, 3)
    with pytest.raises(ValueError, match="max_len must be a positive int; got max_len=2.5"):
        StackCache.allocate(model, 1, 2.5)
    with pytest.raises(TypeError, match="model must be a CausalLM-like model"):
        StackCache.allocate(torch.nn.Linear(2, 2), 1, 3)


def test_inconsistent_cache_is_reported():
    model = build_lm("hybrid")
    cache = StackCache.allocate(model, 1, 8)
    cache.states[1].length = 2  # as if a call had failed after advancing two layers
    with pytest.raises(RuntimeError, match=r"cache is inconsistent: its layers hold \[0, 2, 0, 0\] tokens"):
        model(torch.randint(V, (1, 1)), cache=cache)


# ---------------------------------------------------------------------------- reorder (beam search)

def test_reorder_and_select_rows(model):
    tokens = torch.randint(V, (3, 9))
    cache = StackCache.allocate(model, 3, 9)
    model(tokens[:, :5], cache=cache)
    index = torch.tensor([2, 0, 2, 1])  # duplicate a row, as beam search does; batch 3 -> 4
    cache.reorder(index)
    assert cache.batch_size == 4 and cache.length == 5
    continued = tokens[index]
    steps = torch.cat([model(continued[:, t:t + 1], cache=cache) for t in range(5, 7)], dim=1)
    torch.testing.assert_close(steps, model(continued[:, :7])[:, 5:], **TOL)
    cache.reorder([3])  # keep one row
    torch.testing.assert_close(model(continued[3:, 7:9], cache=cache), model(continued[3:])[:, 7:], **TOL)


def test_reorder_after_left_padding():
    model = build_lm("hybrid")
    prompts = [torch.randint(V, (n,)) for n in (2, 6)]
    tokens, seq_idx = left_padded(prompts)
    cache = StackCache.allocate(model, 2, 8)
    model(tokens, seq_idx=seq_idx, cache=cache)
    cache.reorder([1, 0])
    nxt = torch.randint(V, (2, 1))
    out = model(nxt, cache=cache)
    for row, prompt in ((0, prompts[1]), (1, prompts[0])):
        torch.testing.assert_close(out[row, 0], model(torch.cat([prompt, nxt[row]])[None])[0, -1], **TOL)


@pytest.mark.parametrize("index,match", [
    (torch.tensor([[0]]), "index must be a non-empty 1-D integer tensor"),
    (torch.tensor([], dtype=torch.long), "index must be a non-empty 1-D integer tensor"),
    (torch.tensor([0.0]), "index must be a non-empty 1-D integer tensor"),
    ([0, 3], r"index must lie in \[0, batch_size=3\); got \[0, 3\]"),
    ([-1], r"index must lie in \[0, batch_size=3\)"),
])
def test_reorder_errors(index, match):
    cache = StackCache.allocate(build_lm("sessa"), 3, 4)
    with pytest.raises(ValueError, match=match):
        cache.reorder(index)


# ---------------------------------------------------------------------------- memory

def test_sizes_per_layer_and_per_token():
    model = build_lm("hybrid")
    short, long = StackCache.allocate(model, 2, 10), StackCache.allocate(model, 2, 30)
    sizes = long.layer_sizes()
    assert [s.mixer for s in sizes] == ["sessa", "attention", "mamba2", "sliding_window"]
    assert [s.state for s in sizes] == ["SessaState", "AttentionState", "Mamba2State", "AttentionState"]
    assert [s.nbytes_per_sequence for s in sizes] == [st.nbytes_per_sequence() for st in long.states]
    assert long.nbytes_per_sequence() == sum(s.nbytes_per_sequence for s in sizes)
    head_dim, kv_heads = D // 2, 1
    assert [s.numbers_per_token for s in sizes] == [2 * kv_heads * head_dim + 2 * D, 2 * kv_heads * head_dim, None, None]
    # growth per token = numbers per token x 8 bytes (float64), + 8 bytes of segment-id bookkeeping, + one
    # byte of NaN flags per growing cache (kernels.nan_policy: attention's k/v, Sessa's k_b/s too)
    flags = {"sessa": 2, "attention": 1, "mamba2": 0, "sliding_window": 0}
    for s, t in zip(sizes, short.layer_sizes()):
        grown = (s.nbytes_per_sequence - t.nbytes_per_sequence) / 20
        assert grown == 8 * (s.numbers_per_token or 0) + 8 + flags[s.mixer]
    table = long.describe()
    assert "constant" in table and "SessaState" in table and f"{long.nbytes_per_sequence():,}" in table
    assert repr(long) == "StackCache(batch_size=2, max_len=30, length=0, mixers=['sessa', 'attention', 'mamba2', 'sliding_window'])"


def test_allocate_dtype_and_device():
    cache = StackCache.allocate(build_lm("hybrid"), 1, 4, device="cpu", dtype=torch.float32)
    assert cache.states[0].k.dtype == torch.float32 and cache.states[2].ssm.dtype == torch.float32
    assert (cache.batch_size, cache.max_len, cache.length, cache.num_layers) == (1, 4, 0, 4)
