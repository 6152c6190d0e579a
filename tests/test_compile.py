"""torch.compile(model, fullgraph=True) for every registered library mixer and a hybrid language model.

Dispatch resolves while dynamo traces (guards on dtype, device and shape) and its one-time log line
runs at trace time, so the graphs hold only the chosen backends' computation: zero graph breaks
(torch._dynamo.explain), and fullgraph=True compiles whose forward and backward equal eager ones,
with the "aot_eager" backend: dynamo's graph through AOT autograd's joint forward-backward tracing
and decompositions (what inductor compiles), run by eager kernels, in seconds (inductor itself takes
minutes on 2 cores: `tools/bench.py layer --compile` runs it).
T = 140 exercises the chunked backends (feedback_solve's `chunked` takes T >= 129).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo

import kernels
import kernels.dispatch as dispatch
from blocks.gated_block import GatedBlock
from tests.registry_mixers import factory, names
from zoo.models import CausalLM
from zoo.registry import REGISTRY
from zoo.stack import Stack

DIM, T = 32, 140


def _block(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return GatedBlock(DIM, factory(name))


def _compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor, backend: str = "aot_eager") -> None:
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y = compiled(x)
    y.float().square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(x)
    want.float().square().sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mixer", names())
def test_mixer_compiles_without_graph_breaks(mixer):
    block = _block(mixer)
    x = torch.randn(2, T, DIM)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    _compiled_matches_eager(block, x)


def _hybrid() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(50, DIM, Stack(DIM, "".join(REGISTRY.mixer(m).symbol for m in names() if REGISTRY.mixer(m).symbol)))


def test_hybrid_language_model_compiles_whole():
    model, tokens = _hybrid(), torch.randint(50, (2, T))
    explained = torch._dynamo.explain(model)(tokens)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    _compiled_matches_eager(model, tokens)


def test_dispatch_logs_once_at_trace_time(caplog):
    """Under compile the choice is announced while tracing (not in the graph, not per call), and
    nothing dispatch does (lazy probes included) makes the second call recompile."""
    from torch._dynamo.utils import counters

    block = _block("attention")
    dispatch._logged.discard(("attention", "sdpa"))
    for backend in kernels.get_op("attention").backends.values():
        backend._availability = None  # probed again on the first (traced) call
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    x = torch.randn(2, 9, DIM)
    with caplog.at_level(logging.INFO, logger="kernels"):
        for _ in range(3):
            compiled(x)
    lines = [r.getMessage() for r in caplog.records if r.name == "kernels"]
    assert lines == ["attention: using backend 'sdpa'"]
    assert counters["stats"]["unique_graphs"] == 1
