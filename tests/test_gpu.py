"""The invariants on CUDA (marker `gpu`, `make test-gpu`; skipped with the reason elsewhere), for every
registered library mixer: decode == forward, packed == separate; under automatic selection and with
the Triton backends pinned (native kernels). A hybrid trains a few steps under bf16 autocast, every
op on its Triton backend and on automatic selection. Conformance of each backend on CUDA is in
tests/test_conformance.py (its cuda cases).
"""

from __future__ import annotations

import pytest
import torch

import kernels
from tests.conftest import NEEDS_CUDA
from tests.registry_mixers import factory, names, skip_if_exempt
from zoo.models import CausalLM
from zoo.registry import REGISTRY
from zoo.stack import Stack

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)]

DIM = 64
TRITON = {op: "triton" for op in kernels.OPS if "triton" in kernels.OPS[op].backends}
PINS = {"auto": {}, "triton": TRITON}


def _mixer(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return factory(name)(DIM).cuda()


@pytest.mark.parametrize("pins", list(PINS))
@pytest.mark.parametrize("mixer", names())
def test_decode_equals_forward(mixer, pins):
    model = _mixer(mixer)
    skip_if_exempt(model, mixer, "decode")
    x = torch.randn(2, 70, DIM, device="cuda")
    with torch.no_grad(), kernels.use_backends(**PINS[pins]):
        full = model(x)
        state = model.allocate_state(2, 70)
        pieces = [model(x[:, :33], state=state)] + [model(x[:, t:t + 1], state=state) for t in range(33, 70)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("pins", list(PINS))
@pytest.mark.parametrize("mixer", names())
def test_packed_equals_separate(mixer, pins):
    model = _mixer(mixer)
    skip_if_exempt(model, mixer, "packing")
    lengths = [37, 1, 90]
    docs = [torch.randn(1, n, DIM, device="cuda") for n in lengths]
    seq_idx = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor(lengths, device="cuda"))[None]
    with torch.no_grad(), kernels.use_backends(**PINS[pins]):
        packed = model(torch.cat(docs, dim=1), seq_idx=seq_idx)
        separate = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(packed, separate, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("pins", list(PINS))
def test_hybrid_trains_under_bf16_autocast(pins):
    torch.manual_seed(0)
    symbols = "".join(REGISTRY.mixer(m).symbol for m in names() if REGISTRY.mixer(m).symbol)
    model = CausalLM(256, DIM, Stack(DIM, symbols)).cuda()
    tokens = torch.randint(256, (4, 300), device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    with kernels.use_backends(**PINS[pins]), kernels.record_choices() as chosen:
        for _ in range(8):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.1, losses  # memorising one batch
    if pins == "triton":
        assert {op for op, b in chosen if b == "triton"} == set(TRITON), set(chosen)
