"""The memory-tail probe (zoo/probes, tools/memory_tail.py): the three regimes of the theory, the
measurements against brute force, and the probe on a gin hybrid stack and on a trained run folder."""

from __future__ import annotations

import json
import math
import runpy

import numpy as np
import pytest
import torch

from blocks.attention import Attention
from blocks.mamba2 import Mamba2
from blocks.sessa import Sessa
from kernels.feedback_solve import routing_weights, strict_past
from zoo import gin_config
from zoo.probes import (explicit_construction, feedback_kernel_curve, fit_tail, format_table, forward_ad_backends,
                        jacobian_curve, plot, probe, routing_statistics)

TOOLS = gin_config.CONFIGS_DIR.parent / "tools"


@pytest.mark.parametrize("gain", [0.3, 0.5, 0.9])
def test_uniform_routing_kernel_slope_is_minus_one_minus_gain(gain):
    """The paper's construction: q_b = k_b = 0 (alpha = 1/t), constant gamma -> slope -(1 - gamma)."""
    torch.manual_seed(0)
    mixer = explicit_construction(Sessa(4, num_heads=2), uniform_routing=True, gain=gain)
    result = probe(mixer, torch.randn(1, 4100, 4), label="uniform", sources=(0,), fit_range=(100, 4000),
                   jacobian=False)
    (kernel,) = result.curves
    assert kernel.name == "kernel layer 0"
    assert abs(kernel.fit.slope - (gain - 1.0)) < 0.02
    assert kernel.fit.slope_r2 > 0.999 > kernel.fit.rate_r2  # a power law, not an exponential
    assert kernel.routing.c2 == pytest.approx(1.0, abs=1e-9)
    assert kernel.routing.gamma_abs_max == pytest.approx(gain, abs=1e-7)  # gamma_bias is a float32 weight
    assert kernel.routing.predicted_exponent == pytest.approx(gain - 1.0, abs=1e-7)


def test_uniform_routing_kernel_closed_form():
    """alpha_{t,j} = 1/t, gamma constant: K[t, 0] = (gamma / t) prod_{u<t} (1 + gamma / u), K[0, 0] = 1."""
    gain, T = 0.7, 300
    q = torch.zeros(2, T, 3, dtype=torch.float64)
    curve = feedback_kernel_curve(q, q, torch.full((2, T), gain, dtype=torch.float64), sources=(0,))
    t = np.arange(1, T)
    expected = np.concatenate([[1.0], gain / t * np.concatenate([[1.0], np.cumprod(1 + gain / t[:-1])])])
    np.testing.assert_allclose(curve, expected, rtol=1e-10)


def test_kernel_and_routing_match_the_dense_inverse():
    torch.manual_seed(1)
    B, T, Dk = 2, 24, 5
    q, k = torch.randn(B, T, Dk, dtype=torch.float64) * 2, torch.randn(B, T, Dk, dtype=torch.float64) * 2
    gamma = 0.9 * torch.tanh(torch.randn(B, T, dtype=torch.float64))
    alpha = routing_weights(q, k, strict_past(T, 0, q.device))
    inverse = torch.linalg.inv(torch.eye(T, dtype=torch.float64) - gamma[..., None] * alpha)  # (B, T, T)
    sources = (1, 4)
    L = T - max(sources)
    expected = np.mean([[inverse[b, s + l, s].abs().item() for l in range(L)] for b in range(B) for s in sources], 0)
    np.testing.assert_allclose(feedback_kernel_curve(q, k, gamma, sources), expected, rtol=1e-10)
    stats = routing_statistics(q, k, gamma, block=7)
    t = torch.arange(T, dtype=torch.float64)[:, None]
    assert stats.c2 == pytest.approx(float((alpha * t).amax()), rel=1e-12)
    assert stats.gamma_abs_max == pytest.approx(float(gamma[:, 1:].abs().max()), rel=1e-12)


def test_jacobian_curve_matches_brute_force():
    """Exact mode against torch.autograd.functional.jacobian; the Gaussian estimate is close to it."""
    torch.manual_seed(2)
    from blocks.gated_block import GatedBlock
    from zoo.stack import Stack

    mixers = [Sessa, Attention, lambda d: Mamba2(d, state_dim=4, head_dim=8)]
    module = Stack(8, [lambda d, m=m: GatedBlock(d, m) for m in mixers]).double().eval()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    sources = (0, 3)
    with forward_ad_backends(module):  # sdpa has no forward-mode AD
        exact = jacobian_curve(module, x, sources, rows_per_pass=5)
        estimate = jacobian_curve(module, x, sources, directions=256, generator=torch.Generator().manual_seed(0))
    L = 12 - max(sources)
    sq = np.zeros(L)
    for b in range(2):
        J = torch.autograd.functional.jacobian(module, x[b:b + 1])[0, :, :, 0]  # (T, D, T, D)
        for s in sources:
            sq += np.array([J[s + l, :, s, :].square().sum().item() for l in range(L)])
    np.testing.assert_allclose(exact, np.sqrt(sq / (2 * len(sources))), rtol=1e-9)
    np.testing.assert_allclose(estimate, exact, rtol=0.3)


def test_attention_with_uniform_scores_follows_one_over_t_plus_one():
    torch.manual_seed(3)
    mixer = explicit_construction(Attention(16, num_heads=2), uniform_attention=True)
    for tau in (0, 5):
        result = probe(mixer, torch.randn(2, 64, 16), label="attention", sources=(tau,), fit_range=(4, 50))
        values = result.curves[0].values
        t = tau + np.arange(len(values))
        np.testing.assert_allclose(values * (t + 1), values[0] * (tau + 1), rtol=1e-10)  # exactly c / (t + 1)
    assert result.curves[0].fit.slope_r2 > 0.99


def test_mamba2_with_a_fixed_step_decays_exponentially():
    torch.manual_seed(4)
    step = 0.1
    mixer = explicit_construction(Mamba2(16, state_dim=8, head_dim=8), mamba2_step=step, mamba2_decay=1.0)
    result = probe(mixer, torch.randn(4, 120, 16), label="mamba2", sources=(0, 1, 2, 3), fit_range=(8, 100))
    fit = result.curves[0].fit
    assert fit.rate_r2 > 0.99 > fit.slope_r2  # straight on semi-log axes, not on log-log axes
    assert fit.rate == pytest.approx(step * 1.0, rel=0.05)  # exp(A dt l) with A = -1


def test_fit_tail_recovers_laws_and_checks_its_range():
    lags = np.arange(1000, dtype=np.float64)
    power = np.concatenate([[1.0], lags[1:] ** -0.4])
    fit = fit_tail(power, 10, 999)
    assert fit.slope == pytest.approx(-0.4, abs=1e-12) and fit.slope_r2 == pytest.approx(1.0)
    fit = fit_tail(3.0 * np.exp(-0.05 * lags), 10, 500)
    assert fit.rate == pytest.approx(0.05, abs=1e-12) and fit.semilog_intercept == pytest.approx(math.log(3.0))
    with pytest.raises(ValueError, match="fit_range"):
        fit_tail(power, 0, 100)
    with pytest.raises(ValueError, match="fit_range"):
        fit_tail(power, 10, 1000)


def test_explicit_construction_from_gin_sets_routing_and_gain():
    gin_config.parse(["probes/uniform_routing.gin"], ["GAIN = 0.3"])
    model = gin_config.build_model()
    (mixer,) = [m for m in model.modules() if isinstance(m, Sessa)]
    q_b, k_b, gamma = mixer._feedback_inputs(torch.randn(2, 7, model.dim))
    assert not q_b.any() and not k_b.any()
    torch.testing.assert_close(gamma, torch.full_like(gamma, 0.3))
    with pytest.raises(ValueError, match="no layer"):
        explicit_construction(Attention(8), uniform_routing=True)
    with pytest.raises(ValueError, match="gain"):
        explicit_construction(Sessa(8), gain=0.9995)


def test_tool_on_a_hybrid_stack_of_all_three_mixers(tmp_path, capsys):
    tool = runpy.run_path(str(TOOLS / "memory_tail.py"))
    results = tool["main"](["--gin_file", "probes/random_init.gin", "--gin_param", "DIM = 32",
                            "--layout", "SMSA", "--layout", "A", "--seq_len", "48", "--batch_size", "1",
                            "--sources", "0", "1", "--directions", "2", "--fit_range", "4", "40",
                            "--out", str(tmp_path)])
    hybrid = results[0]
    assert hybrid.label == "SMSA" and [c.name for c in hybrid.curves] == ["jacobian", "kernel layer 0",
                                                                         "kernel layer 1"]
    assert all(np.isfinite(c.values).all() and (c.values > 0).all() for c in hybrid.curves)
    assert "| SMSA | kernel layer 1 |" in capsys.readouterr().out
    assert (tmp_path / "memory_tail.png").stat().st_size > 0
    saved = json.loads((tmp_path / "memory_tail.json").read_text())
    assert [r["label"] for r in saved] == ["SMSA", "A"] and saved[0]["curves"][1]["routing"]["c2"] >= 1.0


def test_tool_on_a_trained_run_folder(tmp_path):
    run = tmp_path / "run"
    train = runpy.run_path(str(TOOLS / "train.py"))
    train["main"](["--gin_file", "train/tasks/symbol_soup.gin", "--gin_file", "hybrids/sessa_attention.gin",
                   "--gin_file", "sizes/tiny.gin", "--gin_param", "DIM = 16", "--gin_param", "NUM_LAYERS = 2",
                   "--gin_param", "SymbolSoup.min_tokens = 40", "--gin_param", "SymbolSoup.max_tokens = 60",
                   "--gin_param", "TrainConfig.steps = 2", "--gin_param", "TrainConfig.batch_size = 4",
                   "--gin_param", "TrainConfig.eval_every = 0", "--gin_param", "TrainConfig.eval_examples = 4",
                   "--gin_param", "TrainConfig.final_eval_examples = 4", "--gin_param", "TrainConfig.log_every = 1",
                   "--run_dir", str(run)])
    tool = runpy.run_path(str(TOOLS / "memory_tail.py"))
    (result,) = tool["main"](["--run", str(run), "--seq_len", "40", "--batch_size", "2", "--sources", "0", "1",
                              "--directions", "2", "--fit_range", "3", "38", "--out", str(tmp_path / "probe")])
    assert result.label == "run" and [c.name for c in result.curves] == ["jacobian", "kernel layer 0"]
    assert all(np.isfinite(c.values).all() for c in result.curves)
    fit = result.curves[0].fit
    assert f"| run | jacobian | {fit.lo}–{fit.hi} | {fit.slope:.3f} | {fit.slope_r2:.4f} |" in format_table([result])
    assert plot([result], tmp_path / "figure.png").stat().st_size > 0
