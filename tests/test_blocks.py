"""Every library mixer in every block type: causality, shape and dtype, gradients to every parameter,
float32 outputs and gradients against float64 with the same weights;
and a hybrid stack whose output does not depend on the backends dispatch picks."""

from __future__ import annotations

import copy

import pytest
import torch

import kernels
from zoo.registry import REGISTRY, underlying_class
from zoo.stack import Stack

DIM = 32
# library mixers only (a test module may register its own), in registration order
MIXERS = [n for n, e in REGISTRY.mixers.items() if underlying_class(e.source).__module__.startswith("blocks.")]
BLOCKS = list(REGISTRY.blocks)
OPTIONS = {"sessa": dict(num_heads=2), "sessa_nofb": dict(num_heads=2), "attention": dict(num_heads=2),
           "mamba2": dict(head_dim=16, state_dim=8, chunk_size=4)}  # chunk 4 < T: several chunks


def make_block(block: str, mixer: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    entry = REGISTRY.mixer(mixer)
    factory = lambda dim: entry.source(dim, **OPTIONS.get(mixer, {}))  # noqa: E731
    return REGISTRY.block(block).source(DIM, mixer=factory).to(dtype)


def test_library_mixers_and_blocks_are_registered():
    assert {"sessa", "attention", "mamba2", "sessa_nofb"} <= set(MIXERS)
    assert {"gated", "residual"} <= set(BLOCKS)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mixer", MIXERS)
def test_causal(block, mixer):
    layer = make_block(block, mixer)
    T = 11
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    y = layer(x)
    for t in (0, 4, T - 1):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, DIM, dtype=torch.float64)
        y2 = layer(x2)
        torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{mixer} in {block}: changing step {t} changed earlier outputs: {m}")
        assert not torch.allclose(y2[:, t], y[:, t]), f"{mixer} in {block}: step {t} ignores its own input"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mixer", MIXERS)
def test_shape_dtype_and_gradients(block, mixer, dtype):
    """Output and every gradient in the layer's dtype; in float32 they match the float64 layer with
    the same weights to 2e-6 (output) and 2e-5 (gradients) of their largest magnitude (measured:
    at most 1.7e-7 and 1.3e-6)."""
    exact = make_block(block, mixer)
    layer = copy.deepcopy(exact).to(dtype)
    x = torch.randn(3, 9, DIM, dtype=torch.float64)
    cotangent = torch.randn(3, 9, DIM, dtype=torch.float64)
    xs = [x.clone().requires_grad_(True), x.to(dtype).requires_grad_(True)]
    y_exact, y = exact(xs[0]), layer(xs[1])
    assert y.shape == x.shape and y.dtype == dtype
    grads_exact = torch.autograd.grad((y_exact * cotangent).sum(), [xs[0], *exact.parameters()])
    grads = torch.autograd.grad((y * cotangent.to(dtype)).sum(), [xs[1], *layer.parameters()], allow_unused=True)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    missing = [n for n, g in zip(names, grads) if g is None or not g.abs().sum() > 0]
    assert not missing, f"{mixer} in {block}: no gradient reaches {missing}"
    assert all(g.dtype == dtype for g in grads)
    assert (y.double() - y_exact).abs().max() <= 2e-6 * y_exact.abs().max()
    for name, g, want in zip(names, grads, grads_exact):
        assert (g.double() - want).abs().max() <= 2e-5 * want.abs().max(), f"{mixer} in {block}: gradient of {name}"


def test_hybrid_stack_does_not_depend_on_backends():
    stack = Stack(DIM, "SAMN", num_layers=8).double()
    x = torch.randn(2, 37, DIM, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 20 + [1] * 17, [0] * 37])

    with kernels.record_choices() as chosen:
        y_auto = stack(x, seq_idx=seq_idx)
    g_auto = torch.autograd.grad(y_auto.square().sum(), [x, *stack.parameters()])
    with kernels.use_backends(attention="reference", feedback_solve="reference", ssd="reference"):
        y_ref = stack(x, seq_idx=seq_idx)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *stack.parameters()])

    assert {b for _, b in chosen} - {"reference"}, f"dispatch chose only reference backends: {set(chosen)}"
    torch.testing.assert_close(y_auto, y_ref, rtol=1e-9, atol=1e-9)
    for a, r in zip(g_auto, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-8)
