"""Stack and models: shapes, layouts, packing with cu_seqlens, decoding states, input validation."""

from __future__ import annotations

import pytest
import torch

from blocks.attention import Attention
from blocks.gated_block import GatedBlock
from blocks.residual_block import ResidualBlock
from blocks.sessa import Sessa
from zoo.cache import StackCache
from zoo.models import CausalLM, SequenceClassifier
from zoo.stack import Stack

V, D = 50, 32


def lm(pattern: str = "SAMN", **kw) -> CausalLM:
    return CausalLM(V, D, lambda d: Stack(d, pattern, **kw)).double()


def test_lm_shapes_and_tied_head():
    model = lm()
    tokens = torch.randint(V, (3, 10))
    logits = model(tokens)
    assert logits.shape == (3, 10, V) and logits.dtype == torch.float64
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.embed.parameters()) + \
        sum(p.numel() for p in model.stack.parameters()) + sum(p.numel() for p in model.norm.parameters())


def test_classifier_reads_out_at_positions():
    model = SequenceClassifier(V, 7, D, Stack(D, "SA")).double()
    tokens = torch.randint(V, (3, 12))
    positions = torch.tensor([11, 4, 0])
    logits = model(tokens, positions)
    assert logits.shape == (3, 7)
    # the readout at position p depends on tokens <= p only (causal stack)
    changed = tokens.clone()
    changed[1, 5:] = (changed[1, 5:] + 1) % V
    torch.testing.assert_close(model(changed, positions)[1], logits[1])


def test_pattern_tiling_and_blocks():
    stack = Stack(D, "SA", num_layers=6, block="residual")
    assert stack.pattern == "SASASA" and len(stack.layers) == 6
    assert all(isinstance(layer, ResidualBlock) for layer in stack.layers)
    assert stack.mixer_names == ["sessa", "attention"] * 3
    with pytest.raises(ValueError, match="num_layers=5 must be a positive multiple of the length of layout 'SA'"):
        Stack(D, "SA", num_layers=5)


def test_list_layout():
    stack = Stack(D, [lambda d: GatedBlock(d, lambda w: Sessa(w, num_heads=2)),
                      lambda d: ResidualBlock(d, lambda w: Attention(w, window=4))])
    assert stack.pattern is None and stack.mixer_names == ["sessa", "attention"]
    assert stack(torch.randn(2, 5, D)).shape == (2, 5, D)
    with pytest.raises(ValueError, match="block='residual' applies to pattern layouts only"):
        Stack(D, [lambda d: GatedBlock(d, Sessa)], block="residual")
    with pytest.raises(TypeError, match="non-empty list of block factories"):
        Stack(D, [])


def test_stack_backends_default_pins_and_mixer_pins_win():
    stack = Stack(D, [lambda d: GatedBlock(d, lambda w: Sessa(w, backends={"attention": "sdpa"})),
                      lambda d: GatedBlock(d, Attention)],
                  backends={"attention": "reference", "ssd": "reference"})
    assert stack.layers[0].mixer.ops == {"attention": "sdpa", "feedback_solve": "auto"}
    assert stack.layers[1].mixer.ops == {"attention": "reference"}
    with pytest.raises(ValueError, match="unknown op 'atention'"):
        Stack(D, "S", backends={"atention": "reference"})


def test_cu_seqlens_packing_equals_separate_documents():
    model = lm()
    docs = [torch.randint(V, (1, n)) for n in (5, 9, 3)]
    packed = model(torch.cat(docs, dim=1), cu_seqlens=torch.tensor([0, 5, 14, 17]))
    separate = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-9, atol=1e-9)


def test_prefill_then_decode_equals_full_forward():
    model = lm("SAMN", num_layers=4)
    tokens = torch.randint(V, (2, 9))
    full = model(tokens)
    cache = StackCache.allocate(model, 2, 9)
    steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("bad,kwargs,error,match", [
    (torch.zeros(2, 4), {}, TypeError, "tokens must have dtype torch.long; got torch.float32"),
    (torch.zeros(4, dtype=torch.long), {}, ValueError, r"tokens must be \(B, T\)"),
    (torch.full((2, 4), V, dtype=torch.long), {}, ValueError, rf"tokens must lie in \[0, vocab_size={V}\); got values in \[{V}, {V}\]"),
    (torch.full((2, 4), -1, dtype=torch.long), {}, ValueError, "tokens must lie in"),
    (torch.zeros(2, 4, dtype=torch.long), {"cu_seqlens": torch.tensor([0, 4])}, ValueError, r"tokens must be \(1, T\)"),
    (torch.zeros(1, 4, dtype=torch.long), {"cu_seqlens": torch.tensor([0, 3])}, ValueError, "cu_seqlens ends at 3"),
    (torch.zeros(1, 4, dtype=torch.long), {"cu_seqlens": torch.tensor([0, 4]), "seq_idx": torch.zeros(1, 4, dtype=torch.long)},
     ValueError, "either seq_idx or cu_seqlens"),
    (torch.zeros(1, 4, dtype=torch.long), {"seq_idx": torch.zeros(1, 3, dtype=torch.long)}, ValueError, r"seq_idx must be .* \(1, 4\)"),
])
def test_lm_input_validation(bad, kwargs, error, match):
    with pytest.raises(error, match=match):
        lm("S")(bad, **kwargs)


def test_classifier_input_validation():
    model = SequenceClassifier(V, 3, D, Stack(D, "A"))
    tokens = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"positions must be a torch.long tensor of shape \(B,\) = \(2,\)"):
        model(tokens, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, T=6\); got \[1, 6\]"):
        model(tokens, torch.tensor([1, 6]))
    with pytest.raises(TypeError, match="tokens must have dtype torch.long"):
        model(tokens.int(), torch.tensor([1, 2]))


def test_stack_validation():
    with pytest.raises(ValueError, match="dim must be a positive int"):
        Stack(0, "S")
    with pytest.raises(ValueError, match=r"x must be \(B, T, 32\)"):
        Stack(D, "S")(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="cache holds 1 layer states but the stack has 2 layers"):
        Stack(D, "SA")(torch.randn(1, 3, D), cache=StackCache.allocate(Stack(D, "S"), 1, 3))
    with pytest.raises(ValueError, match="stack has width 16 but the model has dim=32"):
        CausalLM(V, D, Stack(16, "S"))
