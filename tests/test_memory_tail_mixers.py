"""The memory-tail probe on the recurrent mixers and sliding-window attention: their explicit
constructions (zoo.probes.construction) give the tails their weights predict (zoo.probes.predictions)."""

from __future__ import annotations

import copy
import math
import runpy

import numpy as np
import pytest
import torch

from blocks.attention import Attention
from blocks.gated_block import GatedBlock
from blocks.gated_deltanet import DeltaNet, GatedDeltaNet
from blocks.gla import GatedLinearAttention
from blocks.mamba2 import Mamba2
from blocks.retnet import MultiScaleRetention
from blocks.sessa import Sessa
from blocks.sliding_window import SlidingWindowAttention
from zoo import gin_config
from zoo.probes import TailPrediction, explicit_construction, format_table, mixer_tail, predicted_tail, probe
from zoo.stack import Stack

TOOLS = gin_config.CONFIGS_DIR.parent / "tools"


def test_gla_with_a_fixed_gate_decays_at_exactly_that_rate():
    torch.manual_seed(0)
    mixer = explicit_construction(GatedLinearAttention(16, num_heads=2), fixed_gate=0.03)
    g = torch.nn.functional.logsigmoid(mixer.gk_proj(torch.randn(3, 16))) / mixer.gate_logit_normalizer
    torch.testing.assert_close(g, torch.full_like(g, -0.03))  # every channel, whatever the input
    result = probe(mixer, torch.randn(2, 400, 16), label="L", fit_range=(60, 390))
    fit = result.curves[0].fit
    assert result.prediction == TailPrediction(rate=pytest.approx(0.03))
    assert fit.rate == pytest.approx(0.03, rel=0.03)
    assert fit.rate_r2 > 0.99 > fit.slope_r2  # an exponential, not a power law


def test_retnet_decays_at_its_slowest_head_rate():
    torch.manual_seed(1)
    mixer = MultiScaleRetention(16, num_heads=2)  # gamma = 1 - 2^-5, 1 - 2^-6: no construction needed
    slowest = -math.log(1 - 2.0 ** -6)
    assert mixer_tail(mixer) == TailPrediction(rate=pytest.approx(slowest))
    result = probe(mixer, torch.randn(2, 700, 16), label="R", fit_range=(250, 690))
    fit = result.curves[0].fit
    assert fit.rate == pytest.approx(slowest, rel=0.05)
    assert fit.rate_r2 > 0.98


def test_retnet_is_its_own_construction():
    """Any construction option accepts a RetNet-only model (one config serves every layout) and
    leaves its weights alone; a model with no layer an option acts on is still an error."""
    torch.manual_seed(3)
    mixer = MultiScaleRetention(16, num_heads=2)
    before = copy.deepcopy(mixer.state_dict())
    explicit_construction(mixer, fixed_gate=0.02, constant_beta=True, uniform_attention=True)
    for name, value in mixer.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="no layer"):
        explicit_construction(Mamba2(32, head_dim=16, state_dim=8), fixed_gate=0.02)


def test_gated_deltanet_fixed_gate_adds_its_rate_to_the_delta_rules_erasure():
    """Same weights, gate 0 vs gate r: the whole state is scaled by exp(-r) per step, so the rates
    differ by r; the delta rule's own erasure (beta = 1/2 here) makes both decay."""
    torch.manual_seed(2)
    base = GatedDeltaNet(16, num_heads=2)
    gated = explicit_construction(copy.deepcopy(base), fixed_gate=0.02, constant_beta=True)
    ungated = explicit_construction(copy.deepcopy(base), fixed_gate=0.0, constant_beta=True)
    x = torch.randn(2, 400, 16)
    fits = [probe(m, x, label="G", fit_range=(60, 390)).curves[0].fit for m in (gated, ungated)]
    assert fits[0].rate - fits[1].rate == pytest.approx(0.02, rel=0.1)
    assert fits[0].rate > 0.02 and fits[1].rate > 0  # the erasure alone decays too
    assert mixer_tail(gated) == TailPrediction(rate=pytest.approx(0.02), lower_bound=True)
    beta = torch.sigmoid(gated.b_proj(torch.randn(3, 16)))
    torch.testing.assert_close(beta, torch.full_like(beta, 0.5))
    assert mixer_tail(DeltaNet(16, num_heads=2)) is None  # no decay to read off


def test_sliding_window_with_uniform_scores_is_exactly_zero_from_the_window_on():
    torch.manual_seed(3)
    window = 24
    mixer = explicit_construction(SlidingWindowAttention(16, num_heads=2, window=window), uniform_attention=True)
    for tau in (0, 5):
        (curve,) = probe(mixer, torch.randn(2, 80, 16), label="W", sources=(tau,)).curves
        lags = np.arange(len(curve.values))
        inside = lags < window
        counts = np.minimum(tau + lags[inside] + 1, window)  # the query averages this many values
        np.testing.assert_allclose(curve.values[inside] * counts, curve.values[0] * min(tau + 1, window), rtol=1e-10)
        assert not curve.values[~inside].any() and curve.cutoff == window
    assert mixer_tail(mixer) == TailPrediction(cutoff=window)


def test_predictions_compose_over_a_stack():
    def stack(*mixers):
        return Stack(16, [lambda d, m=m: GatedBlock(d, m) for m in mixers])

    windows = stack(lambda d: SlidingWindowAttention(d, window=8), lambda d: SlidingWindowAttention(d, window=5))
    assert predicted_tail(windows) == TailPrediction(cutoff=1 + 7 + 4)
    torch.manual_seed(4)
    x = torch.randn(1, 40, 16)
    (curve,) = probe(windows, x, label="WW", sources=(0,)).curves
    assert curve.cutoff == 1 + 7 + 4  # the two windows' reach adds up
    gla = lambda d: explicit_construction(GatedLinearAttention(d, num_heads=2), fixed_gate=0.5)  # noqa: E731
    mixed = predicted_tail(stack(gla, lambda d: MultiScaleRetention(d, num_heads=2),
                                 lambda d: SlidingWindowAttention(d, window=8)))
    assert mixed == TailPrediction(rate=pytest.approx(-math.log(1 - 2.0 ** -6)))  # the slowest layer
    assert predicted_tail(stack(gla, Sessa)) is None  # Sessa has no fixed rate
    assert predicted_tail(stack(gla, Attention)) is None
    mamba = explicit_construction(Mamba2(16, state_dim=4, head_dim=8), mamba2_step=0.1, mamba2_decay=2.0)
    assert mixer_tail(mamba) == TailPrediction(rate=pytest.approx(0.2))
    assert mixer_tail(Mamba2(16, state_dim=4, head_dim=8)) is None  # the step depends on the input


def test_new_construction_options_check_their_values():
    with pytest.raises(ValueError, match="fixed_gate"):
        explicit_construction(GatedLinearAttention(16, num_heads=2), fixed_gate=-0.1)
    with pytest.raises(ValueError, match="fixed_gate"):
        explicit_construction(GatedLinearAttention(16, num_heads=2), fixed_gate=math.inf)
    with pytest.raises(ValueError, match="no layer"):
        explicit_construction(Attention(16), fixed_gate=0.1)
    with pytest.raises(ValueError, match="no layer"):
        explicit_construction(GatedLinearAttention(16, num_heads=2), constant_beta=True)


def test_tool_tables_predictions_and_cutoffs(tmp_path):
    tool = runpy.run_path(str(TOOLS / "memory_tail.py"))
    results = tool["main"](["--gin_file", "probes/constructions.gin", "--gin_param", "DIM = 16",
                            "--gin_param", "SlidingWindowAttention.window = 16", "--layout", "W", "--layout", "L",
                            "--seq_len", "96", "--batch_size", "1", "--sources", "0", "--directions", "2",
                            "--out", str(tmp_path)])
    window, gla = results
    assert window.curves[0].cutoff == 16 and window.curves[0].fit.hi == 15  # fitted below the cut-off
    assert gla.prediction == TailPrediction(rate=pytest.approx(0.02))
    table = (tmp_path / "memory_tail.md").read_text()
    assert "| W | jacobian | 6–15 |" in table and "| zero from lag 16 | 16 |" in table
    assert "| L | jacobian |" in table and "| rate 0.02 | – |" in format_table([gla])
