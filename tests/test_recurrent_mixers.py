"""Gated DeltaNet, DeltaNet, GLA, RetNet and sliding-window attention as their papers state them: the
op inputs each mixer forms (seen through a recording backend), FLA's parameter names and shapes,
decoding-state sizes, the short convolution, the gated norm, and errors that name the argument.
(Causality, decoding, packing, gradients and backend-independence run for every registered mixer in
test_blocks.py, test_cache.py and test_packing.py.)"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from blocks.attention import Attention
from blocks.gated_deltanet import DeltaNet, GatedDeltaNet
from blocks.gla import GatedLinearAttention
from blocks.norms import GatedRMSNorm
from blocks.retnet import MultiScaleRetention
from blocks.short_conv import ShortConvolution
from blocks.sliding_window import SlidingWindowAttention
from kernels.delta_rule import delta_rule
from kernels.delta_rule.reference import delta_rule_reference
from kernels.linear_attention import linear_attention
from kernels.linear_attention.reference import linear_attention_reference
from zoo.cache import StackCache
from zoo.stack import Stack

D = 32
TOL = dict(rtol=1e-12, atol=1e-12)


@contextlib.contextmanager
def recorded(op, reference):
    """A lowest-priority backend `record` of `op` that stores its inputs and runs the reference."""
    calls = []

    @op.register("record", priority=-1)
    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return reference(*args, **kwargs)

    try:
        yield calls
    finally:
        op.unregister("record")


def heads(x, d):
    return x.reshape(*x.shape[:2], -1, d)


@pytest.mark.parametrize("cls", [GatedDeltaNet, DeltaNet])
def test_gated_deltanet_default_widths_are_the_papers_allocation(cls):
    """Defaults: keys 0.75 dim and values 1.5 dim over the heads, so q_proj, k_proj hold 0.75 dim^2
    parameters each and v_proj, g_proj, o_proj 1.5 dim^2 each (about 6 dim^2, as Mamba-2)."""
    layer = cls(256, num_heads=4)
    assert (layer.head_k_dim, layer.head_v_dim) == (48, 96)
    sizes = {name: getattr(layer, name).weight.numel() / 256**2 for name in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")}
    assert sizes == {"q_proj": 0.75, "k_proj": 0.75, "v_proj": 1.5, "g_proj": 1.5, "o_proj": 1.5}


@pytest.mark.parametrize("cls", [GatedDeltaNet, DeltaNet])
def test_gated_deltanet_forms_the_papers_inputs(cls):
    torch.manual_seed(0)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    with recorded(delta_rule, delta_rule_reference) as calls:
        layer = cls(D, num_heads=2, head_dim=8, expand_v=1.5, backends={"delta_rule": "record"}).double()
        y = layer(x)
    (q, k, v, beta, g), kwargs = calls[0]
    conv = lambda c, u: F.silu(F.conv1d(F.pad(u.mT, (3, 0)), c.weight, groups=u.shape[-1]).mT)  # noqa: E731
    l2 = lambda u: u / torch.sqrt(u.square().sum(-1, keepdim=True) + 1e-6)  # noqa: E731  (FLA's l2norm)
    torch.testing.assert_close(q, l2(heads(conv(layer.q_conv1d, layer.q_proj(x)), 8)), **TOL)
    torch.testing.assert_close(k, l2(heads(conv(layer.k_conv1d, layer.k_proj(x)), 8)), **TOL)
    torch.testing.assert_close(v, heads(conv(layer.v_conv1d, layer.v_proj(x)), 12), **TOL)
    torch.testing.assert_close(beta, torch.sigmoid(layer.b_proj(x)), **TOL)
    if cls is GatedDeltaNet:
        torch.testing.assert_close(g, -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias), **TOL)
    else:
        assert g is None and not hasattr(layer, "a_proj") and not hasattr(layer, "A_log")
    assert kwargs["chunk_size"] == 32 and "scale" not in kwargs  # default scale dk^-1/2
    o = delta_rule_reference(q, k, v, beta, g)
    gate = heads(layer.g_proj(x), 12)
    expected = layer.o_proj((o * torch.rsqrt(o.square().mean(-1, keepdim=True) + 1e-5) * layer.o_norm.weight
                             * F.silu(gate)).flatten(2))
    torch.testing.assert_close(y, expected, **TOL)


def test_gla_forms_the_papers_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    with recorded(linear_attention, linear_attention_reference) as calls:
        layer = GatedLinearAttention(D, num_heads=2, backends={"linear_attention": "record"}).double()
        y = layer(x)
    (q, k, v, g), _ = calls[0]
    dk, dv = D // 2 // 2, D // 2
    torch.testing.assert_close(q, heads(layer.q_proj(x), dk), **TOL)
    torch.testing.assert_close(k, heads(layer.k_proj(x), dk), **TOL)
    torch.testing.assert_close(v, heads(layer.v_proj(x), dv), **TOL)
    low_rank = x @ layer.gk_proj[0].weight.T @ layer.gk_proj[1].weight.T + layer.gk_proj[1].bias
    torch.testing.assert_close(g, heads(torch.log(torch.sigmoid(low_rank) ** (1 / 16)), dk), **TOL)  # alpha^(1/tau)
    o = linear_attention_reference(q, k, v, g)
    expected = layer.o_proj((o * torch.rsqrt(o.square().mean(-1, keepdim=True) + 1e-5)
                             * layer.g_norm_swish_gate.weight * F.silu(heads(layer.g_proj(x), dv))).flatten(2))
    torch.testing.assert_close(y, expected, **TOL)


def test_retnet_forms_the_papers_inputs():
    torch.manual_seed(0)
    x = torch.randn(1, 6, D, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with recorded(linear_attention, linear_attention_reference) as calls:
        layer = MultiScaleRetention(D, num_heads=4, backends={"linear_attention": "record"}).double()
        layer(x, seq_idx=seq_idx)
    (q, k, v, g), kwargs = calls[0]
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(4)], dtype=torch.float64)
    torch.testing.assert_close(g, torch.log(gamma).expand(1, 6, 4), **TOL)
    positions = torch.tensor([0, 1, 2, 0, 1, 2])  # RoPE positions restart in every segment
    torch.testing.assert_close(q, layer.rotary(heads(layer.q_proj(x), 8), positions), **TOL)
    torch.testing.assert_close(k, layer.rotary(heads(layer.k_proj(x), 8), positions), **TOL)
    assert kwargs["seq_idx"] is seq_idx and "log_decay" not in layer.state_dict()


# FLA's parameter names and shapes (fla/layers: gated_deltanet.py, delta_net.py with use_gate, gla.py,
# multiscale_retention.py), for width 64, 2 heads
FLA_LAYOUT = {
    "gdn": (lambda: GatedDeltaNet(64, num_heads=2, head_dim=16), {
        "q_proj.weight": (32, 64), "k_proj.weight": (32, 64), "v_proj.weight": (64, 64), "b_proj.weight": (2, 64),
        "a_proj.weight": (2, 64), "A_log": (2,), "dt_bias": (2,), "q_conv1d.weight": (32, 1, 4),
        "k_conv1d.weight": (32, 1, 4), "v_conv1d.weight": (64, 1, 4), "g_proj.weight": (64, 64),
        "o_norm.weight": (32,), "o_proj.weight": (64, 64)}),
    "deltanet": (lambda: DeltaNet(64, num_heads=2, head_dim=16), {
        "q_proj.weight": (32, 64), "k_proj.weight": (32, 64), "v_proj.weight": (64, 64), "b_proj.weight": (2, 64),
        "q_conv1d.weight": (32, 1, 4), "k_conv1d.weight": (32, 1, 4), "v_conv1d.weight": (64, 1, 4),
        "g_proj.weight": (64, 64), "o_norm.weight": (32,), "o_proj.weight": (64, 64)}),
    "gla": (lambda: GatedLinearAttention(64, num_heads=2), {
        "q_proj.weight": (32, 64), "k_proj.weight": (32, 64), "v_proj.weight": (64, 64), "g_proj.weight": (64, 64),
        "gk_proj.0.weight": (16, 64), "gk_proj.1.weight": (32, 16), "gk_proj.1.bias": (32,),
        "o_proj.weight": (64, 64), "g_norm_swish_gate.weight": (32,)}),
    "retnet": (lambda: MultiScaleRetention(64, num_heads=2), {
        "q_proj.weight": (64, 64), "k_proj.weight": (64, 64), "v_proj.weight": (128, 64), "g_proj.weight": (128, 64),
        "o_proj.weight": (64, 128), "g_norm_swish_gate.weight": (64,)}),
}


@pytest.mark.parametrize("name", list(FLA_LAYOUT))
def test_parameter_names_and_shapes_follow_fla(name):
    build, layout = FLA_LAYOUT[name]
    assert {k: tuple(v.shape) for k, v in build().state_dict().items()} == layout


def test_gla_and_retnet_short_convs_are_optional():
    assert {"q_conv1d.weight", "v_conv1d.bias"} <= set(GatedLinearAttention(64, use_short_conv=True, conv_bias=True).state_dict())
    assert "q_conv1d.weight" in MultiScaleRetention(64, num_heads=2, use_short_conv=True).state_dict()


@pytest.mark.parametrize("build,conv_numbers", [
    (lambda: GatedDeltaNet(D, num_heads=2, head_dim=8, expand_v=2, conv_size=3), 2 * (8 + 8 + 16) * 2),
    (lambda: GatedLinearAttention(D, num_heads=2), 0),
    (lambda: MultiScaleRetention(D, num_heads=2), 0),
])
def test_decoding_state_is_constant_and_counted(build, conv_numbers):
    layer = build().double()
    assert layer.state_numbers_per_token() is None
    short, long = layer.allocate_state(3, 10), layer.allocate_state(3, 50)
    H, dk, dv = layer.num_heads, layer.head_k_dim, layer.head_v_dim
    # float64 numbers: conv window + one (dk, dv) state per head; int64 segment ids of the conv window;
    # bookkeeping: segment ids per position (8 bytes) and the next position
    K = layer.conv_size
    expected = 8 * (conv_numbers + H * dk * dv) + 8 * (K - 1) + 8 * 10 + 8
    assert short.nbytes_per_sequence() == expected
    assert long.nbytes_per_sequence() - short.nbytes_per_sequence() == 8 * 40  # bookkeeping only


def test_cache_describes_the_new_mixers():
    stack = Stack(D, "GDLRW").double()
    sizes = StackCache.allocate(stack, 1, 8).layer_sizes()
    assert [s.mixer for s in sizes] == ["gated_deltanet", "deltanet", "gla", "retnet", "sliding_window"]
    assert [s.state for s in sizes] == ["RecurrentState"] * 4 + ["AttentionState"]
    assert [s.numbers_per_token for s in sizes] == [None] * 5


def test_sliding_window_is_attention_with_a_window():
    torch.manual_seed(0)
    sw = SlidingWindowAttention(D, num_heads=2, window=4).double()
    full = Attention(D, num_heads=2, window=4).double()
    full.load_state_dict(sw.state_dict())
    x = torch.randn(2, 9, D, dtype=torch.float64)
    torch.testing.assert_close(sw(x), full(x), **TOL)
    assert SlidingWindowAttention(D).window == 512
    with pytest.raises(ValueError, match="SlidingWindowAttention needs a window"):
        SlidingWindowAttention(D, window=None)


def test_short_convolution():
    torch.manual_seed(0)
    conv = ShortConvolution(6, kernel_size=3, bias=True).double()
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    taps = torch.stack([F.pad(x, (0, 0, s, 0))[:, :8] for s in (2, 1, 0)], dim=-1)  # x_{t-2}, x_{t-1}, x_t
    expected = F.silu((taps * conv.weight[:, 0]).sum(-1) + conv.bias)
    torch.testing.assert_close(conv(x), expected, **TOL)
    # segments: the second document (from t = 3) never reads the first
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
    torch.testing.assert_close(conv(x, seq_idx)[:, 3:], conv(x[:, 3:]), **TOL)
    # decoding: continue from the window of the last K - 1 inputs (and their segment ids)
    zeros = torch.zeros(2, 8, dtype=torch.long)
    torch.testing.assert_close(conv(x[:, 5:], zeros[:, 5:], x[:, 3:5], zeros[:, 3:5]), conv(x)[:, 5:], **TOL)
    torch.testing.assert_close(conv(x[:, 4:], seq_idx[:, 4:], x[:, 2:4], seq_idx[:, 2:4]), conv(x[:, 3:])[:, 1:], **TOL)
    with pytest.raises(ValueError, match="kernel_size must be a positive int; got kernel_size=0"):
        ShortConvolution(4, kernel_size=0)


def test_gated_rms_norm_before_or_after_the_gate():
    torch.manual_seed(0)
    x, z = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    rms = lambda t: t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-5)  # noqa: E731
    torch.testing.assert_close(GatedRMSNorm(8, norm_before_gate=True).double()(x, z), rms(x) * F.silu(z), **TOL)
    torch.testing.assert_close(GatedRMSNorm(8).double()(x, z), rms(x * F.silu(z)), **TOL)


@pytest.mark.parametrize("build,match", [
    (lambda: GatedDeltaNet(D, num_heads=0), "GatedDeltaNet: num_heads must be a positive int; got num_heads=0"),
    (lambda: GatedDeltaNet(D, num_heads=64), "GatedDeltaNet: head_dim must be a positive int; got head_dim=0"),
    (lambda: DeltaNet(D, expand_v=0.3), r"DeltaNet: expand_v \* head_dim must be a positive integer"),
    (lambda: GatedDeltaNet(D, chunk_size=0), "chunk_size must be a positive int"),
    (lambda: GatedDeltaNet(D, backends={"linear_attention": "chunked"}),
     "backends names op 'linear_attention', which this mixer does not call; it calls: delta_rule"),
    (lambda: GatedLinearAttention(D, num_heads=3), r"GatedLinearAttention: expand_k \* dim = 16.0 must be a positive "
                                                   r"integer divisible by num_heads=3"),
    (lambda: GatedLinearAttention(D, gate_logit_normalizer=0), "gate_logit_normalizer must be > 0"),
    (lambda: MultiScaleRetention(D, num_heads=32), "RoPE needs an even key width per head"),
    (lambda: MultiScaleRetention(D, backends={"linear_attention": "nope"}), "unknown backend 'nope'"),
])
def test_argument_errors_name_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_retnet_decays_span_the_heads():
    """gamma_h = 1 - 2^(-5-h): the effective memory 1 / (1 - gamma_h) doubles from head to head, from 32 steps."""
    layer = MultiScaleRetention(D, num_heads=4)
    memory = 1 / (1 - layer.log_decay.exp())
    torch.testing.assert_close(memory, torch.tensor([32.0, 64.0, 128.0, 256.0], dtype=torch.float64), rtol=1e-9, atol=0)
    assert math.isclose(float(layer.log_decay[0]), math.log(1 - 2 ** -5))


def test_info_lists_the_new_ops_backends_and_mixers():
    from tools.info import backends_text, registry_text

    mixers, ops = registry_text(), backends_text()
    for symbol, name, origin in [("W", "sliding_window", "SlidingWindowAttention"), ("G", "gated_deltanet", "GatedDeltaNet"),
                                 ("D", "deltanet", "DeltaNet"), ("L", "gla", "GatedLinearAttention"),
                                 ("R", "retnet", "MultiScaleRetention")]:
        assert any(line.split()[:2] == [symbol, name] and line.endswith(origin) for line in mixers.splitlines()), name
    for op in ("linear_attention", "delta_rule"):
        header, *rest = ops.split(f"\n  {op}  ")[1].splitlines()
        rows = [line.split() for line in itertools.takewhile(lambda line: line.startswith("    "), rest)]
        assert header.startswith("[typical input "), op
        assert [r[:3] for r in rows if r[0] in ("chunked", "reference")] == [["chunked", "priority", "10"],
                                                                            ["reference", "priority", "0"]], op
        assert all(len(r) > 3 for r in rows), op  # every backend says whether it was picked, or why not
