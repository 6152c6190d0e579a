"""Mamba2's upstream options (dt_limit, gated_norm, norm_before_gate, norm_eps, conv_bias, bias,
D_per_channel, ssm_dim) keep the layer's invariants: decoding == full forward, left-padded rows ==
each row alone, packed documents == separate ones (forward and gradients), every parameter trained.
Their numerics against mamba_ssm / Hugging Face are in tests/test_interop_*.py."""

from __future__ import annotations

import pytest
import torch

from blocks.mamba2 import Mamba2
from blocks.norms import GatedRMSNorm
from kernels.packing import seq_idx_from_cu_seqlens, seq_idx_from_padding
from tests.tolerances import INTEROP

TOL = INTEROP[torch.float64]
DIM = 16
OPTIONS = {
    "dt_limit": dict(dt_limit=(0.05, 0.3)),
    "dt_limit_lower_only": dict(dt_limit=(0.2, None)),
    "no_gated_norm": dict(gated_norm=False),
    "norm_before_gate": dict(norm_before_gate=True, norm_eps=1e-3),
    "biases": dict(bias=True, conv_bias=False),
    "D_per_channel": dict(D_per_channel=True),
    "ssm_dim": dict(ssm_dim=16, D_per_channel=True),
}


def make(seed=0, **kw) -> Mamba2:
    torch.manual_seed(seed)
    cfg = dict(state_dim=8, expand=2, head_dim=8, num_groups=2, conv_kernel=4, chunk_size=8, dt_max=0.5, **kw)
    m = Mamba2(DIM, **cfg).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("D", "in_proj.bias", "out_proj.bias", "conv1d.bias"):
                p.normal_(std=0.5)
            elif name == "norm.weight":
                p.normal_(1.0, 0.2)
    return m


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("option", OPTIONS)
def test_decoding_equals_full_forward(option):
    m = make(**OPTIONS[option])
    x = rand(2, 19, DIM)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_state(2, 19)
        prefill = m(x[:, :11], state=state)
        steps = [m(x[:, t:t + 1], state=state) for t in range(11, 19)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, **TOL)


@pytest.mark.parametrize("option", OPTIONS)
def test_left_padding_and_packing_equal_separate_rows(option):
    m = make(**OPTIONS[option])
    lengths = torch.tensor([12, 5])
    x = rand(2, 12, DIM, seed=2)
    with torch.no_grad():
        padded = m(x, seq_idx=seq_idx_from_padding(lengths, 12))
        for b, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(padded[b:b + 1, 12 - n:], m(x[b:b + 1, 12 - n:]), **TOL)
    cu = torch.tensor([0, 4, 5, 12])
    xs = rand(1, 12, DIM, seed=3).requires_grad_(True)
    packed = m(xs, seq_idx=seq_idx_from_cu_seqlens(cu))
    separate = torch.cat([m(xs[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    torch.testing.assert_close(packed, separate, **TOL)
    packed.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_option_shapes_and_errors():
    m = make(ssm_dim=16, D_per_channel=True, gated_norm=False, bias=True, conv_bias=False)
    assert (m.num_heads, m.d_ssm, m.d_mlp) == (2, 16, 16) and m.D.shape == (16,) and m.norm is None
    assert m.in_proj.out_features == 2 * 16 + 16 + (16 + 2 * 2 * 8) + 2 and m.conv1d.bias is None
    assert m.out_proj.in_features == 32 and m.in_proj.bias is not None
    for kwargs, match in [(dict(ssm_dim=12), "ssm_dim = 12 must be divisible by head_dim"),
                          (dict(ssm_dim=64), "ssm_dim must be an int in"), (dict(norm_eps=0), "norm_eps"),
                          (dict(gated_norm=False, norm_before_gate=True), "norm_before_gate=True needs")]:
        with pytest.raises(ValueError, match=match):
            Mamba2(DIM, head_dim=8, **kwargs)


def test_norm_before_gate_is_rmsnorm_then_gate():
    x, z = rand(2, 3, 12, seed=4), rand(2, 3, 12, seed=5)
    norm = GatedRMSNorm(12, group_size=6, norm_before_gate=True).double()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    halves = [h / h.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() for h in x.split(6, dim=-1)]
    want = torch.cat(halves, dim=-1) * norm.weight * torch.nn.functional.silu(z)
    torch.testing.assert_close(norm(x, z), want, **TOL)


def test_residual_in_fp32_keeps_a_float32_stream_and_changes_nothing_in_float32():
    from functools import partial

    from blocks.residual_block import ResidualBlock
    from zoo.models import CausalLM
    from zoo.stack import Stack

    def lm(flag):
        torch.manual_seed(0)
        block = partial(ResidualBlock, mixer=partial(Mamba2, head_dim=8, state_dim=4), mlp=None, norm="rmsnorm",
                        residual_in_fp32=flag)
        return CausalLM(50, DIM, Stack(DIM, [block, block]), norm="rmsnorm", tie_embeddings=False).eval()

    tokens = torch.randint(50, (2, 9))
    with torch.no_grad():
        assert torch.equal(lm(True)(tokens), lm(False)(tokens))
        model = lm(True).bfloat16()
        stream = model.stack.layers[0](model.embed(tokens))
        assert stream.dtype == torch.float32 and model(tokens).dtype == torch.bfloat16
