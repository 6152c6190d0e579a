"""NaN locality, for every registered mixer (tests/registry_mixers.py), alone and in every block: a NaN
or inf in one channel of x at (row 0, step 6), in the middle of the second of three packed
documents, makes that step's output NaN in every channel (a mixer without an op, such as the
depthwise short_conv, passes the NaN or inf on in its own channel) and leaves every earlier step,
the other documents and the other row exactly as with a clean x; the same when decoding (a prefill
of the first two documents, then token by token: the third document starts from a state that has
seen the NaN), which gives the forward pass's NaN steps exactly. The ops guarantee it for their part
(kernels.nan_policy); this checks the mixers' own paths (convs, norms, gates, caches) around them."""

from __future__ import annotations

import pytest
import torch

from tests.registry_mixers import factory, names, skip_if_exempt
from zoo.registry import REGISTRY

D = 32
SEQ_IDX = torch.tensor([[0] * 4 + [1] * 5 + [2] * 4, [0] * 13])
ROW, STEP = 0, 6  # the poisoned position: document 1 of row 0 holds steps 4..8
UNTOUCHED = torch.ones(2, 13, dtype=torch.bool)
UNTOUCHED[ROW, STEP:9] = False  # may be NaN: the rest of the poisoned document


def _poisoned(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[ROW, STEP, 3] = value
    return x


def _check(name: str, y: torch.Tensor, clean: torch.Tensor, module: torch.nn.Module) -> None:
    if getattr(module, "ops", True):  # a block, or a mixer whose ops make every element of the output NaN
        assert torch.isnan(y[ROW, STEP]).all(), f"{name}: the poisoned step's output is not NaN: {y[ROW, STEP]}"
    else:  # a mixer without an op (short_conv, depthwise) passes the NaN or inf on in its own channel
        assert not torch.isfinite(y[ROW, STEP, 3]), f"{name}: the poison did not reach its channel: {y[ROW, STEP]}"
    torch.testing.assert_close(y[UNTOUCHED], clean[UNTOUCHED], rtol=1e-12, atol=1e-12,
                               msg=lambda m: f"{name}: a NaN reached an earlier step, another row or document: {m}")


def _build(mixer: str, block: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    module = factory(mixer)(D) if block is None else REGISTRY.block(block).source(D, mixer=factory(mixer))
    module = module.double()
    skip_if_exempt(module if block is None else module.mixer, mixer, "nan")
    return module


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("block", [None, *REGISTRY.blocks])
@pytest.mark.parametrize("mixer", names())
def test_nan_stays_in_its_document(mixer, block, value):
    module = _build(mixer, block)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    with torch.no_grad():
        _check(f"{mixer} in {block or 'no block'}", module(_poisoned(x, value), seq_idx=SEQ_IDX),
               module(x, seq_idx=SEQ_IDX), module)


@pytest.mark.parametrize("mixer", names())
def test_nan_stays_in_its_document_when_decoding(mixer):
    module = _build(mixer, None)
    skip_if_exempt(module, mixer, "decode")
    x = torch.randn(2, 13, D, dtype=torch.float64)

    def decode(x):
        state = module.allocate_state(2, 13, dtype=torch.float64)
        ys = [module(x[:, :9], seq_idx=SEQ_IDX[:, :9], state=state)]
        ys += [module(x[:, t:t + 1], seq_idx=SEQ_IDX[:, t:t + 1], state=state) for t in range(9, 13)]
        return torch.cat(ys, dim=1)

    with torch.no_grad():
        y = decode(_poisoned(x, float("nan")))
        _check(f"{mixer} decoding", y, decode(x), module)
        forward = module(_poisoned(x, float("nan")), seq_idx=SEQ_IDX)  # decoding gives the same NaN steps
        assert torch.equal(torch.isnan(y), torch.isnan(forward)), f"{mixer}: decoding and forward disagree on NaN"
