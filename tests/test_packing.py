"""Packed sequences equal separate ones, for every registered mixer (tests/registry_mixers.py), a
stack of each (gated and residual blocks), a hybrid stack and a hybrid CausalLM: documents packed
along time (seq_idx / cu_seqlens, one or several rows, documents of length 1) give the same outputs
and the same gradients (parameters and inputs) as each document run alone, in float64 to 1e-10."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.registry_mixers import factory, names, skip_if_exempt
from tests.test_cache import LAYERS, MODELS, TOL, build_lm
from zoo.stack import Stack

D, V = 32, 50

# documents per row (each row the same total length); many of length 1
LAYOUTS = {
    "one_row": [[1, 4, 1, 6, 3]],
    "two_rows": [[3, 1, 5], [1, 1, 7]],
    "all_ones": [[1, 1, 1, 1]],
}


def seq_idx_of(layout: list[list[int]]) -> Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in layout])


def documents(layout: list[list[int]]):
    """(row, start, end) of every document."""
    for b, row in enumerate(layout):
        start = 0
        for n in row:
            yield b, start, start + n
            start += n


def check_packed_equals_separate(module: nn.Module, layout: list[list[int]]) -> None:
    T = sum(layout[0])
    x = torch.randn(len(layout), T, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(layout), T, D, dtype=torch.float64)  # a loss touching every output

    packed = module(x, seq_idx=seq_idx_of(layout))
    (packed * weight).sum().backward()
    packed_grads = [p.grad.clone() for p in module.parameters()]
    packed_x_grad = x.grad.clone()

    module.zero_grad()
    x.grad = None
    pieces = {(b, s): module(x[b:b + 1, s:e]) for b, s, e in documents(layout)}
    sum(((y * weight[b:b + 1, s:s + y.shape[1]]).sum() for (b, s), y in pieces.items())).backward()

    for (b, s), y in pieces.items():
        torch.testing.assert_close(packed[b:b + 1, s:s + y.shape[1]], y, **TOL)
    torch.testing.assert_close(packed_x_grad, x.grad, **TOL)
    for (name, p), g in zip(module.named_parameters(), packed_grads):
        assert p.grad is not None, name
        torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mixer", names())
def test_mixer_packed_equals_separate(mixer, layout):
    module = factory(mixer)(D).double()
    skip_if_exempt(module, mixer, "packing")
    check_packed_equals_separate(module, LAYOUTS[layout])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("stack", MODELS)
def test_stack_packed_equals_separate(stack, layout):
    """A gated and a residual block around every mixer, and the hybrid."""
    module = Stack(D, LAYERS[stack]).double()
    for layer in module.layers:
        skip_if_exempt(layer.mixer, stack, "packing")
    check_packed_equals_separate(module, LAYOUTS[layout])


def test_causal_lm_cu_seqlens_equals_separate():
    model = build_lm("hybrid")
    lengths = [1, 5, 1, 1, 7, 2]
    tokens = torch.randint(V, (1, sum(lengths)))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    targets = torch.randint(V, (1, sum(lengths)))

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")

    packed = model(tokens, cu_seqlens=cu_seqlens)
    loss(packed, targets).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    bounds = list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
    separate = [model(tokens[:, s:e]) for s, e in bounds]
    sum(loss(y, targets[:, s:e]) for y, (s, e) in zip(separate, bounds)).backward()

    torch.testing.assert_close(packed, torch.cat(separate, dim=1), **TOL)
    for (name, p), g in zip(model.named_parameters(), packed_grads):
        torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m: f"gradient of {name}: {m}")
