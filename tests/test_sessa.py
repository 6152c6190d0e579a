"""Sessa mixer: the reference computation (written here independently from sessa.md), checkpoint
loading, decoding (prefill / chunks / single steps), left padding, packing, causality, errors."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from blocks.attention import Attention
from blocks.gated_block import GatedBlock
from blocks.reference_format import load_reference_block, to_reference_state_dict
from blocks.sessa import Sessa, SessaState
from kernels import record_choices, use_backends
from kernels.packing import seq_idx_from_cu_seqlens, seq_idx_from_padding

F64 = dict(atol=2e-14, rtol=2e-14)  # float64: about 10x the largest difference these checks show


@pytest.fixture(params=["auto", "reference"])
def backends(request):
    """Run a test with the default dispatch and with both ops pinned to their reference backends."""
    with use_backends(attention=request.param, feedback_solve=request.param):
        yield request.param


# ---------------------------------------------------------------- the reference, from the equations
def reference_state_dict(D, H, Hkv, rope=True, max_len=None, dtype=torch.float64):
    """Random weights under the reference SessaLayer key names (what torch.save of that layer holds)."""
    d = D // H
    r = lambda *shape, scale=1.0: (torch.randn(*shape) * scale).to(dtype)  # noqa: E731
    sd = {
        "ln.weight": 1 + r(D, scale=0.1), "ln.bias": r(D, scale=0.1),
        "W_in.weight": r(2 * D, D, scale=D ** -0.5), "W_in.bias": r(2 * D, scale=0.1),
        "mixer.q_proj.weight": r(D, D, scale=D ** -0.5), "mixer.q_proj.bias": r(D, scale=0.1),
        "mixer.k_proj.weight": r(Hkv * d, D, scale=D ** -0.5), "mixer.k_proj.bias": r(Hkv * d, scale=0.1),
        "mixer.v_proj.weight": r(Hkv * d, D, scale=D ** -0.5), "mixer.v_proj.bias": r(Hkv * d, scale=0.1),
        "mixer.proj_fb.weight": r(2 * D, D, scale=2 * D ** -0.5), "mixer.proj_fb.bias": r(2 * D, scale=0.1),
        "mixer.gamma_bias": torch.tensor(1.0, dtype=dtype),
        "mixer.gamma_ctx.weight": r(1, D, scale=D ** -0.5),
        "W_out.weight": r(D, D, scale=D ** -0.5), "W_out.bias": r(D, scale=0.1),
    }
    if H > 1:
        sd["mixer.out_proj.weight"] = r(D, D, scale=D ** -0.5)
    if rope:  # the reference's buffer, computed in float32 and cast along with the layer
        sd["mixer.rope_inv_freq"] = (10000.0 ** (-2 * torch.arange(d // 2, dtype=torch.float32) / d)).to(dtype)
    if max_len:
        ones = torch.ones(max_len, max_len, dtype=torch.bool)
        sd["mixer.causal_mask_f_full"] = torch.triu(ones, diagonal=1)
        sd["mixer.causal_mask_fb_full"] = torch.triu(ones, diagonal=0)
    return sd


def reference_layer(sd, x, H, gamma_max=0.999, rope=True):
    """One Sessa layer on x (B, T, D), straight from sessa.md with explicit loops over t, j and heads."""
    B, T, D = x.shape
    d = D // H
    Hkv = sd["mixer.k_proj.weight"].shape[0] // d
    lin = lambda z, name: torch.einsum("btd,od->bto", z, sd[f"{name}.weight"]) + sd[f"{name}.bias"]  # noqa: E731

    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    x_ln = (x - mean) / torch.sqrt(var + 1e-5) * sd["ln.weight"] + sd["ln.bias"]
    a, g = lin(x_ln, "W_in")[..., :D], lin(x_ln, "W_in")[..., D:]
    a_bar = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))

    q = lin(a_bar, "mixer.q_proj").reshape(B, T, H, d)
    k = lin(a_bar, "mixer.k_proj").reshape(B, T, Hkv, d)
    v = lin(a_bar, "mixer.v_proj").reshape(B, T, Hkv, d)
    if rope:
        inv_freq = sd.get("mixer.rope_inv_freq", 10000.0 ** (-2 * torch.arange(d // 2, dtype=torch.float32) / d))
        angles = (torch.arange(T, dtype=torch.float32)[:, None] * inv_freq).to(x.dtype)  # (T, d/2)
        cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]

        def rotate(z):
            out = torch.empty_like(z)
            out[..., 0::2] = z[..., 0::2] * cos - z[..., 1::2] * sin
            out[..., 1::2] = z[..., 0::2] * sin + z[..., 1::2] * cos
            return out
        q, k = rotate(q), rotate(k)

    f = torch.zeros(B, T, H, d, dtype=x.dtype)
    for h in range(H):
        kv = h // (H // Hkv)  # query heads are grouped consecutively over the kv heads
        for t in range(T):
            logits = torch.einsum("bd,bjd->bj", q[:, t, h], k[:, :t + 1, kv]) / math.sqrt(d)
            f[:, t, h] = torch.einsum("bj,bjd->bd", torch.softmax(logits, -1), v[:, :t + 1, kv])
    f = f.reshape(B, T, D)
    if H > 1:
        f = f @ sd["mixer.out_proj.weight"].T

    fb = lin(a_bar, "mixer.proj_fb")
    q_b, k_b = fb[..., :D], fb[..., D:]
    gamma = gamma_max * torch.tanh(sd["mixer.gamma_bias"] + a_bar @ sd["mixer.gamma_ctx.weight"][0])  # (B, T)
    s = torch.zeros_like(f)
    s[:, 0] = f[:, 0]
    for t in range(1, T):
        alpha = torch.softmax(torch.einsum("bd,bjd->bj", q_b[:, t], k_b[:, :t]) / math.sqrt(D), -1)
        s[:, t] = f[:, t] + gamma[:, t, None] * torch.einsum("bj,bjd->bd", alpha, s[:, :t])

    return x + lin(s * g, "W_out")


@pytest.mark.parametrize("H,Hkv,rope", [(1, 1, True), (4, 2, True), (4, 4, True), (2, 1, False)])
def test_loader_reproduces_reference(H, Hkv, rope, backends):
    D, T = 16, 11
    sd = reference_state_dict(D, H, Hkv, rope=rope, max_len=32)
    block = load_reference_block(sd, num_heads=H if not rope else None, rope=rope)
    assert block.mixer.num_heads == H and block.mixer.num_kv_heads == Hkv
    x = torch.randn(2, T, D, dtype=torch.float64)
    torch.testing.assert_close(block(x), reference_layer(sd, x, H, rope=rope), **F64)


def test_loader_float32_and_gamma_max():
    sd = reference_state_dict(16, 2, 2, dtype=torch.float32)
    block = load_reference_block(sd, num_heads=2, gamma_max=0.9)
    assert block.W_in.weight.dtype == torch.float32 and block.mixer.gamma_max == 0.9
    x = torch.randn(2, 9, 16)
    want = reference_layer({k: v.double() for k, v in sd.items()}, x.double(), 2, gamma_max=0.9)
    torch.testing.assert_close(block(x).double(), want, atol=4e-6, rtol=4e-6)  # float32: measured 4.5e-7


def test_round_trip():
    block = GatedBlock(16, partial(Sessa, num_heads=4, num_kv_heads=2)).double()
    sd = to_reference_state_dict(block)
    assert set(sd) == set(reference_state_dict(16, 4, 2))
    again = load_reference_block(sd)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(again(x), block(x), atol=0, rtol=0)
    torch.testing.assert_close(block(x), reference_layer(sd, x, 4), **F64)
    with pytest.raises(ValueError, match="feedback"):
        to_reference_state_dict(GatedBlock(16, partial(Sessa, feedback=False)))
    with pytest.raises(ValueError, match="base"):
        to_reference_state_dict(GatedBlock(16, partial(Sessa, num_heads=2, rope_base=500.0)))


@pytest.mark.parametrize("edit,kwargs,match", [
    (lambda sd: sd.pop("mixer.proj_fb.bias"), {}, "missing.*mixer.proj_fb.bias"),
    (lambda sd: sd.update({"mixer.extra": torch.zeros(1)}), {}, "unexpected.*mixer.extra"),
    (lambda sd: sd.update({"mixer.gamma_ctx.weight": torch.zeros(16)}), {}, "mixer.gamma_ctx.weight has shape"),
    (lambda sd: sd.update({"mixer.v_proj.weight": torch.zeros(4, 16)}), {}, "mixer.v_proj.weight has shape"),
    (lambda sd: sd.update({"mixer.rope_inv_freq": torch.ones(2)}), {}, "rope_inv_freq"),
    (lambda sd: sd.pop("mixer.rope_inv_freq"), {}, "pass num_heads"),
    (lambda sd: None, dict(num_heads=1), "num_heads=1"),
    (lambda sd: None, dict(num_heads=4, num_kv_heads=4), "num_kv_heads=4"),
    (lambda sd: None, dict(rope=False), "rope=False"),
    (lambda sd: sd.pop("ln.weight"), {}, "ln.weight"),
])
def test_loader_errors(edit, kwargs, match):
    sd = reference_state_dict(16, 4, 2)
    edit(sd)
    with pytest.raises(ValueError, match=match):
        load_reference_block(sd, **kwargs)


def test_loader_h1_rejects_heads():
    with pytest.raises(ValueError, match="n_heads=1"):
        load_reference_block(reference_state_dict(16, 1, 1), num_heads=2)


@pytest.mark.parametrize("D", [32, 48])
def test_parameter_count(D):
    block = GatedBlock(D, partial(Sessa, num_heads=4))
    assert sum(p.numel() for p in block.parameters()) == 9 * D * D + 11 * D + 1
    names = {n for n, _ in block.mixer.named_parameters()}
    assert names == {f"{m}.{w}" for m in ("q_proj", "k_proj", "v_proj", "proj_fb") for w in ("weight", "bias")} | {
        "out_proj.weight", "gamma_bias", "gamma_ctx.weight"}
    assert block.mixer.gamma_bias.item() == 1.0


# ---------------------------------------------------------------- decoding
def decode(block, x, chunks, seq_idx=None, max_len=None):
    """Feed x (B, T, D) in chunks of the given sizes (repeated) through a fresh state."""
    state = block.allocate_state(x.shape[0], max_len or x.shape[1])
    out, t, i = [], 0, 0
    while t < x.shape[1]:
        n = chunks[i % len(chunks)]
        ids = None if seq_idx is None else seq_idx[:, t:t + n]
        out.append(block(x[:, t:t + n], seq_idx=ids, state=state))
        t, i = t + n, i + 1
    assert state.length == x.shape[1]
    return torch.cat(out, dim=1)


def make_block(H=1, Hkv=None, feedback=True, D=16, rope=True):
    return GatedBlock(D, partial(Sessa, num_heads=H, num_kv_heads=Hkv, feedback=feedback, rope=rope)).double()


MIXERS = [dict(H=1), dict(H=4, Hkv=2), dict(H=2, feedback=False), dict(H=2, rope=False)]


@pytest.mark.parametrize("cfg", MIXERS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("chunks", [[1], [3], [7], [10, 1], [2, 5]])
def test_decode_equals_forward(cfg, chunks, backends):
    """Token by token, chunked prefill (lengths not multiples) and prefill + single steps == one forward."""
    block = make_block(**cfg)
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(decode(block, x, chunks, max_len=23), block(x), **F64)


def test_decode_packed_and_padded_chunks(backends):
    """A row holding several segments (pads, documents of length 1), fed in chunks across boundaries."""
    block = make_block(H=4, Hkv=2)
    seq_idx = torch.tensor([[-1, -1, 0, 0, 0, 1, 2, 2, 2, 2, 3, 4, 4, 4],
                            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    with torch.no_grad():
        full = block(x, seq_idx=seq_idx)
        for chunks in ([1], [3], [4, 7]):
            torch.testing.assert_close(decode(block, x, chunks, seq_idx=seq_idx), full, **F64)


def test_left_padded_batch_equals_rows_alone(backends):
    block = make_block(H=2)
    lengths, total, steps = torch.tensor([5, 9, 1]), 9, 4
    seq_idx = seq_idx_from_padding(lengths, total)
    prompts = torch.randn(3, total, 16, dtype=torch.float64)
    new = torch.randn(3, steps, 16, dtype=torch.float64)
    with torch.no_grad():
        state = block.allocate_state(3, total + steps)
        batch_prefill = block(prompts, seq_idx=seq_idx, state=state)
        batch_steps = torch.cat([block(new[:, i:i + 1], state=state) for i in range(steps)], dim=1)
        batch_full = block(prompts, seq_idx=seq_idx)
        for b, n in enumerate(lengths.tolist()):
            alone = block.allocate_state(1, n + steps)
            prefill = block(prompts[b:b + 1, total - n:], state=alone)
            steps_alone = torch.cat([block(new[b:b + 1, i:i + 1], state=alone) for i in range(steps)], dim=1)
            torch.testing.assert_close(batch_prefill[b, total - n:], prefill[0], **F64)
            torch.testing.assert_close(batch_full[b, total - n:], prefill[0], **F64)
            torch.testing.assert_close(batch_steps[b], steps_alone[0], **F64)


@pytest.mark.parametrize("cfg", [dict(H=1), dict(H=4, Hkv=2)], ids=["H1", "H4-Hkv2"])
def test_packed_equals_separate(cfg, backends):
    """Forward and every gradient (inputs and parameters) of packed documents == documents one by one."""
    block = make_block(**cfg)
    lengths = [5, 1, 8, 3]
    x = torch.randn(1, sum(lengths), 16, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(1, sum(lengths), 16, dtype=torch.float64)
    seq_idx = seq_idx_from_cu_seqlens(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]))
    packed = block(x, seq_idx=seq_idx)
    grads_packed = torch.autograd.grad((packed * cot).sum(), [x, *block.parameters()])

    pieces, loss = [], 0
    for doc_x, doc_cot in zip(x.split(lengths, dim=1), cot.split(lengths, dim=1)):
        y = block(doc_x)
        pieces.append(y)
        loss = loss + (y * doc_cot).sum()
    grads_separate = torch.autograd.grad(loss, [x, *block.parameters()])
    torch.testing.assert_close(packed, torch.cat(pieces, dim=1), **F64)
    for gp, gs in zip(grads_packed, grads_separate):
        torch.testing.assert_close(gp, gs, **F64)


@pytest.mark.parametrize("cfg", MIXERS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_causal(cfg):
    block = make_block(**cfg)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y = block(x)
    x2 = x.clone()
    x2[:, 8:] += torch.randn(2, 5, 16, dtype=torch.float64)
    y2 = block(x2)
    torch.testing.assert_close(y2[:, :8], y[:, :8], atol=1e-12, rtol=0)
    assert (y2[:, 8:] - y[:, 8:]).abs().amin(dim=-1).gt(0).all()


def test_gradients_reach_every_parameter():
    block = make_block(H=4, Hkv=2)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    block(x).pow(2).sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_state_layout_and_size():
    block = make_block(H=4, Hkv=2)  # D = 16, d = 4
    state = block.allocate_state(3, 10)
    assert isinstance(state, SessaState)
    assert state.k.shape == state.v.shape == (3, 10, 2, 4) and state.k_b.shape == state.s.shape == (3, 10, 16)
    assert block.mixer.state_numbers_per_token() == 2 * 2 * 4 + 2 * 16
    # float64 numbers + int64 seq_idx + two bool NaN flags (k/v and k_b/s; kernels.nan_policy) per step, next_pos
    assert state.nbytes_per_sequence() == 10 * (48 * 8 + 8 + 2) + 8
    assert make_block(H=2, feedback=False).mixer.state_numbers_per_token() == 2 * 16
    with pytest.raises(ValueError, match="max_len=10"):
        block(torch.randn(3, 11, 16, dtype=torch.float64), state=state)
    with pytest.raises(ValueError, match="batch 3"):
        block(torch.randn(2, 1, 16, dtype=torch.float64), state=state)


def test_reorder_state():
    block = make_block(H=2)
    x = torch.randn(3, 8, 16, dtype=torch.float64)
    index = torch.tensor([2, 0, 1])
    with torch.no_grad():
        state = block.allocate_state(3, 8)
        block(x[:, :5], state=state)
        state.reorder(index)
        got = torch.cat([block(x[index, t:t + 1], state=state) for t in range(5, 8)], dim=1)
        want = block(x[index])[:, 5:]
    torch.testing.assert_close(got, want, **F64)


# ---------------------------------------------------------------- constructor and backends
@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=12, num_heads=5), "num_heads"),
    (dict(dim=12, num_heads=0), "num_heads"),
    (dict(dim=16, num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(dim=12, num_heads=4), "head dim"),
    (dict(dim=16, gamma_max=1.0), "gamma_max"),
    (dict(dim=16, gamma_max=0.0), "gamma_max"),
    (dict(dim=16, backends={"ssd": "reference"}), "it calls: attention, feedback_solve"),
    (dict(dim=16, backends={"nope": "reference"}), "unknown op 'nope'; valid ops: attention, .*feedback_solve"),
    (dict(dim=16, feedback=False, backends={"feedback_solve": "reference"}), "it calls: attention$"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sessa(**kwargs)


def test_unknown_backend_lists_valid():
    with pytest.raises(ValueError, match=r"backends\['feedback_solve'\].*'nope'.*valid: auto, reference"):
        Sessa(16, backends={"feedback_solve": "nope"})


def test_odd_head_dim_without_rope():
    assert Sessa(12, num_heads=4, rope=False).head_dim == 3


def test_pinned_backends_are_used():
    block = GatedBlock(16, partial(Sessa, num_heads=2, backends={"attention": "reference", "feedback_solve": "reference"}))
    x = torch.randn(2, 5, 16)
    with record_choices() as choices:
        block(x)
        state = block.allocate_state(2, 6)
        block(x, state=state)
        block(x[:, :1], state=state)
    assert choices and set(choices) == {("attention", "reference"), ("feedback_solve", "reference")}


def test_forward_branch_is_the_attention_mixer():
    """With feedback=False, Sessa is the Attention mixer with biased q/k/v projections (and no
    out_proj when H == 1): same weights, same outputs, full forward and decoding."""
    for H in (1, 4):
        sessa = Sessa(16, num_heads=H, num_kv_heads=max(1, H // 2), feedback=False).double()
        attention = Attention(16, num_heads=H, num_kv_heads=max(1, H // 2), qkv_bias=True, out_proj=H > 1).double()
        attention.load_state_dict(sessa.state_dict())
        x = torch.randn(2, 9, 16, dtype=torch.float64)
        torch.testing.assert_close(sessa(x), attention(x), atol=0, rtol=0)
        with torch.no_grad():
            s_state, a_state = sessa.allocate_state(2, 9), attention.allocate_state(2, 9)
            for t in range(9):
                torch.testing.assert_close(sessa(x[:, t:t + 1], state=s_state), attention(x[:, t:t + 1], state=a_state),
                                           atol=0, rtol=0)
    with pytest.raises(TypeError, match="SessaState"):
        Sessa(16)(torch.randn(1, 2, 16), state=Attention(16).allocate_state(1, 2))


def test_uniform_attention_construction_leaves_sessa_alone():
    """Sessa subclasses Attention; the probes' `uniform_attention` acts on the attention mixers only."""
    from zoo.probes.construction import explicit_construction

    block_s, block_a = GatedBlock(16, partial(Sessa, num_heads=2)), GatedBlock(16, partial(Attention, num_heads=2))
    before = block_s.mixer.q_proj.weight.clone()
    explicit_construction(torch.nn.Sequential(block_s, block_a), uniform_attention=True)
    assert not block_a.mixer.q_proj.weight.any() and torch.equal(block_s.mixer.q_proj.weight, before)
    with pytest.raises(ValueError, match="no layer"):
        explicit_construction(block_s, uniform_attention=True)
