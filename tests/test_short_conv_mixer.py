"""The short-convolution mixer (K): its equation, state size and errors. Causality, decoding,
packing and gradients are covered for it by the registry-driven invariant tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blocks.short_conv_mixer import ShortConv
from zoo.cache import StackCache
from zoo.models import CausalLM
from zoo.stack import Stack


def test_short_conv_is_a_causal_depthwise_convolution_then_silu():
    torch.manual_seed(0)
    mixer = ShortConv(6, kernel_size=3, bias=True).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    w, b = mixer.conv1d.weight[:, 0], mixer.conv1d.bias  # (D, K), (D,)
    padded = F.pad(x, (0, 0, 2, 0))  # two zero steps before the first
    expected = torch.stack([F.silu(b + sum(w[:, i] * padded[:, t + i] for i in range(3))) for t in range(9)], dim=1)
    torch.testing.assert_close(mixer(x), expected, rtol=1e-12, atol=1e-12)


def test_short_conv_state_is_its_window():
    model = CausalLM(16, 8, stack=lambda d: Stack(d, "KA", num_layers=2))
    cache = StackCache.allocate(model, batch_size=3, max_len=20)
    sizes = cache.layer_sizes()
    assert [s.mixer for s in sizes] == ["short_conv", "attention"]
    assert sizes[0].numbers_per_token is None  # constant: (kernel_size - 1) * D numbers and their segment ids
    state = cache.states[0]
    assert tuple(state.conv.shape) == (3, 3, 8) and tuple(state.conv_seq.shape) == (3, 3)


def test_short_conv_errors_name_the_argument():
    with pytest.raises(ValueError, match="kernel_size"):
        ShortConv(8, kernel_size=0)
    with pytest.raises(ValueError, match="dim"):
        ShortConv(0)
    with pytest.raises(ValueError, match="seq_idx"):
        ShortConv(4)(torch.randn(2, 5, 4), seq_idx=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="calls no op|does not call"):
        ShortConv(4, backends={"attention": "sdpa"})
