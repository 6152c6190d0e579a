"""Every registered mixer (tests/registry_mixers.py) in every block type: causality, shape and dtype,
gradients to every parameter, float32 outputs and gradients against float64 with the same weights;
a stack of each whose output and gradients do not depend on the backends its ops run on (every
combination that runs here); a hybrid stack under automatic dispatch."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import kernels
from blocks.gated_block import GatedBlock
from blocks.mixer import INVARIANTS
from tests.registry_mixers import factory, names, skip_if_exempt
from zoo.registry import REGISTRY
from zoo.stack import Stack

DIM = 32
MIXERS = names()
BLOCKS = list(REGISTRY.blocks)


def make_block(block: str, mixer: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    return REGISTRY.block(block).source(DIM, mixer=factory(mixer)).to(dtype)


def test_library_mixers_and_blocks_are_registered():
    assert {"sessa", "attention", "mamba2", "sessa_nofb", "sliding_window", "gated_deltanet", "deltanet", "gla",
            "retnet"} <= set(MIXERS)
    assert {"gated", "residual"} <= set(BLOCKS)


@pytest.mark.parametrize("mixer", MIXERS)
def test_declared_exemptions_name_known_invariants(mixer):
    declared = getattr(factory(mixer)(DIM), "invariant_exemptions", {})
    assert set(declared) <= set(INVARIANTS), f"{mixer}: unknown invariants {set(declared) - set(INVARIANTS)}"
    assert all(isinstance(reason, str) and reason for reason in declared.values()), f"{mixer}: give each a reason"


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mixer", MIXERS)
def test_causal(block, mixer):
    layer = make_block(block, mixer)
    skip_if_exempt(layer.mixer, mixer, "causal")
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
    skip_if_exempt(exact.mixer, mixer, "gradients")
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


def _run(stack: Stack, x: torch.Tensor, seq_idx: torch.Tensor, **pins: str):
    """Output, gradients (input and parameters) and the (op, backend) pairs dispatch used."""
    with kernels.use_backends(**pins), kernels.record_choices() as chosen:
        y = stack(x, seq_idx=seq_idx)
        grads = torch.autograd.grad(y.square().sum(), [x, *stack.parameters()])
    return y, grads, set(chosen)


@pytest.mark.parametrize("mixer", MIXERS)
def test_stack_does_not_depend_on_backends(mixer):
    """Two layers of `mixer`, T = 37 with a segment starting mid-chunk: every combination of the
    backends available here for the ops the mixer calls (and automatic dispatch) gives the
    all-reference output and gradients. Combinations a backend declines (Triton: no float64) are
    passed over; if no backend but reference can run, the test is skipped and lists why."""
    torch.manual_seed(0)
    stack = Stack(DIM, [lambda d: GatedBlock(d, factory(mixer))] * 2).double()
    skip_if_exempt(stack.layers[0].mixer, mixer, "backends")
    ops = sorted(stack.layers[0].mixer.ops)
    if not ops:
        pytest.skip(f"{mixer} calls no op")
    x = torch.randn(2, 37, DIM, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 19 + [1] * 18, [0] * 37])
    y_ref, g_ref, _ = _run(stack, x, seq_idx, **{op: "reference" for op in ops})

    available = [[name for name, b in kernels.get_op(op).backends.items() if b.unavailable_reason() is None]
                 for op in ops]
    combos = [dict(zip(ops, names)) for names in itertools.product(*available)] + [{}]  # {}: automatic dispatch
    used, declined = set(), []
    for pins in combos:
        if pins and set(pins.values()) == {"reference"}:
            continue
        try:
            y, grads, chosen = _run(stack, x, seq_idx, **pins)
        except kernels.BackendError as e:
            declined.append(f"{pins}: {str(e).splitlines()[0]}")
            continue
        assert set(pins.items()) <= chosen, f"{mixer}: pinned {pins} but dispatch used {chosen}"
        used |= chosen
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"{mixer} {pins or 'auto'}: {m}")
        for a, r in zip(grads, g_ref):
            torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-8,
                                       msg=lambda m: f"{mixer} {pins or 'auto'} gradient: {m}")
    if not {backend for _, backend in used} - {"reference"}:
        pytest.skip(f"{mixer}: no backend but reference runs here for {ops}; declined: {declined}")


def test_hybrid_stack_under_automatic_dispatch():
    stack = Stack(DIM, "SAMNWGDLR").double()
    x = torch.randn(2, 70, DIM, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 33 + [1] * 37, [0] * 70])

    with kernels.record_choices() as chosen:
        y_auto = stack(x, seq_idx=seq_idx)
    g_auto = torch.autograd.grad(y_auto.square().sum(), [x, *stack.parameters()])
    with kernels.use_backends(**{op: "reference" for op in kernels.OPS}):
        y_ref = stack(x, seq_idx=seq_idx)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *stack.parameters()])

    assert {b for _, b in chosen} - {"reference"}, f"dispatch chose only reference backends: {set(chosen)}"
    torch.testing.assert_close(y_auto, y_ref, rtol=1e-9, atol=1e-9)
    for a, r in zip(g_auto, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-8)
