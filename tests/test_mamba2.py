"""Mamba2 mixer: the whole layer against an independent per-token statement of its equations
(forward, packing, left padding, decoding); decoding == full forward (token by token, prefill +
decode, chunked prefill), segments (left padding, packing, resets while decoding), causality,
gradients, float32 / bfloat16 accuracy, constructor errors."""

from __future__ import annotations

import pytest
import torch

from blocks.mamba2 import Mamba2, Mamba2State
from blocks.norms import GatedRMSNorm, RMSNorm
from kernels.packing import seq_idx_from_cu_seqlens, seq_idx_from_padding

TOL = dict(atol=2e-14, rtol=2e-14)  # float64: about 10x the largest difference these checks show
DIM = 16


def make(seed=0, **kw) -> Mamba2:
    """A small float64 layer with every parameter randomised (so each one matters)."""
    torch.manual_seed(seed)
    cfg = dict(state_dim=8, expand=2, head_dim=8, num_groups=2, conv_kernel=4, chunk_size=8, dt_max=0.5)
    cfg.update(kw)
    m = Mamba2(DIM, **cfg).double()
    with torch.no_grad():
        m.D.normal_()
        m.conv1d.bias.normal_(std=0.3)
        m.norm.weight.normal_(1.0, 0.2)
    return m


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def decode_in_chunks(m, x, sizes, seq_idx=None):
    state = m.allocate_state(x.shape[0], x.shape[1])
    outs, t = [], 0
    for n in sizes:
        outs.append(m(x[:, t:t + n], seq_idx=None if seq_idx is None else seq_idx[:, t:t + n], state=state))
        t += n
    assert t == x.shape[1] and state.length == t
    return torch.cat(outs, dim=1)


def chunks_of(T, n):
    return [n] * (T // n) + ([T % n] if T % n else [])


# ---------------------------------------------------------------- the layer, from the equations
def reference_layer(m: Mamba2, u: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Mamba-2 on u (B, T, dim), one token at a time with explicit loops, from the equations of
    Dao & Gu (2024) / mamba_ssm's Mamba2 layer; reads only the layer's parameters and sizes.

    A segment (a run of equal ids in seq_idx) starts from nothing: the conv sees zeros before its
    first token and the state starts at 0."""
    Bt, T, _ = u.shape
    H, P, N, G, K = m.num_heads, m.head_dim, m.state_dim, m.num_groups, m.conv_kernel
    d_inner, gN = H * P, G * N
    ids = torch.zeros(Bt, T, dtype=torch.long) if seq_idx is None else seq_idx
    w_conv = m.conv1d.weight[:, 0]  # (channels, K); tap k reads the input K - 1 - k steps back
    A = -torch.exp(m.A_log)  # (H,)
    out = torch.zeros_like(u)
    for b in range(Bt):
        xbc_in, h, start = [], torch.zeros(H, P, N, dtype=u.dtype), 0
        for t in range(T):
            if t > 0 and ids[b, t] != ids[b, t - 1]:  # a new segment: forget the conv inputs and the state
                start, h = t, torch.zeros(H, P, N, dtype=u.dtype)
            proj = m.in_proj.weight @ u[b, t]  # no bias
            z, xbc, dt_raw = proj[:d_inner], proj[d_inner:2 * d_inner + 2 * gN], proj[2 * d_inner + 2 * gN:]
            xbc_in.append(xbc)
            conv = m.conv1d.bias.clone()
            for k in range(K):  # causal depthwise conv: input t - (K-1) + k, within the segment
                j = t - (K - 1) + k
                if j >= start:
                    conv = conv + w_conv[:, k] * xbc_in[j]
            conv = conv * torch.sigmoid(conv)  # SiLU
            x, Bv, Cv = conv[:d_inner].reshape(H, P), conv[d_inner:d_inner + gN].reshape(G, N), conv[d_inner + gN:].reshape(G, N)
            dt = torch.log1p(torch.exp(dt_raw + m.dt_bias))  # softplus, (H,)
            y = torch.zeros(H, P, dtype=u.dtype)
            for hd in range(H):
                g = hd // (H // G)  # heads share B, C in consecutive blocks of H / G
                h[hd] = torch.exp(dt[hd] * A[hd]) * h[hd] + dt[hd] * torch.outer(x[hd], Bv[g])
                y[hd] = h[hd] @ Cv[g] + m.D[hd] * x[hd]
            gated = y.reshape(d_inner) * (z * torch.sigmoid(z))  # y * SiLU(z)
            groups = gated.reshape(G, d_inner // G)
            normed = groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)  # RMSNorm per group
            out[b, t] = m.out_proj.weight @ (normed.reshape(d_inner) * m.norm.weight)
    return out


@pytest.mark.parametrize("cfg", [dict(), dict(num_groups=1, conv_kernel=2), dict(head_dim=4, num_groups=4, state_dim=3)],
                         ids=["G2-K4", "G1-K2", "G4-N3"])
def test_layer_equals_the_equations(cfg):
    """The full forward, packed documents (a reused id, length-1 segments), left padding and
    decoding in chunks all equal the per-token statement above, in float64."""
    m = make(**cfg)
    x = rand(2, 13, DIM, seed=13)
    packed = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 2, 0, 0, 0, 3, 3],
                           [-1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])  # row 1: left padding
    with torch.no_grad():
        want = reference_layer(m, x)
        torch.testing.assert_close(m(x), want, **TOL)
        torch.testing.assert_close(decode_in_chunks(m, x, [5, 1, 1, 6]), want, **TOL)
        want_packed = reference_layer(m, x, packed)
        torch.testing.assert_close(m(x, seq_idx=packed), want_packed, **TOL)
        torch.testing.assert_close(decode_in_chunks(m, x, [1] * 13, packed), want_packed, **TOL)
        torch.testing.assert_close(decode_in_chunks(m, x, [4, 4, 5], packed), want_packed, **TOL)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_decoding_equals_full_forward(backend):
    m = make(backends={"ssd": backend})
    x = rand(2, 21, DIM)
    with torch.no_grad():
        full = m(x)
        torch.testing.assert_close(decode_in_chunks(m, x, [1] * 21), full, **TOL)  # token by token
        torch.testing.assert_close(decode_in_chunks(m, x, [13] + [1] * 8), full, **TOL)  # prefill + decode
        for n in (2, 3, 5, 8, 21):  # chunked prefill
            torch.testing.assert_close(decode_in_chunks(m, x, chunks_of(21, n)), full, **TOL)


def test_backends_agree_and_seq_idx_zero_equals_none():
    x = rand(2, 19, DIM)
    with torch.no_grad():
        want = make(backends={"ssd": "reference"})(x)
        m = make(backends={"ssd": "chunked"})
        torch.testing.assert_close(m(x), want, **TOL)
        torch.testing.assert_close(m(x, seq_idx=torch.zeros(2, 19, dtype=torch.long)), want, **TOL)  # masked conv path


@pytest.mark.parametrize("conv_kernel", [1, 2, 4])
def test_decoding_across_segment_changes(conv_kernel):
    """Segments that change mid-stream while decoding (inside the conv window, at a chunk start,
    length-1 segments) give the same result as the full forward over the same segment ids."""
    m = make(conv_kernel=conv_kernel)
    x = rand(2, 20, DIM, seed=2)
    seq_idx = torch.tensor([[0] * 6 + [1] + [2] * 2 + [3] * 11,
                            [4] * 10 + [5] * 3 + [6] + [7] * 6])
    with torch.no_grad():
        full = m(x, seq_idx=seq_idx)
        for sizes in ([1] * 20, [6, 1, 2, 11], [10, 3, 7], [4, 5, 5, 6]):
            torch.testing.assert_close(decode_in_chunks(m, x, sizes, seq_idx), full, **TOL)


def test_left_padded_batch_equals_each_row_alone():
    m = make()
    T, new = 12, 5
    lengths = torch.tensor([12, 7, 1])
    x = rand(3, T + new, DIM, seed=3)
    seq_idx = seq_idx_from_padding(lengths, T)
    with torch.no_grad():
        full = m(x[:, :T], seq_idx=seq_idx)
        state = m.allocate_state(3, T + new)
        prefill = m(x[:, :T], seq_idx=seq_idx, state=state)
        steps = torch.cat([m(x[:, T + i:T + i + 1], state=state) for i in range(new)], dim=1)
        for b, n in enumerate(lengths.tolist()):
            alone = m(x[b:b + 1, T - n:])  # the row's prompt and its continuation, no pads
            torch.testing.assert_close(full[b:b + 1, T - n:], alone[:, :n], **TOL)
            torch.testing.assert_close(prefill[b:b + 1, T - n:], alone[:, :n], **TOL)
            torch.testing.assert_close(steps[b:b + 1], alone[:, n:], **TOL)


def test_packed_equals_separate_forward_and_gradients():
    lengths = [5, 1, 9, 3, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = rand(1, sum(lengths), DIM, seed=4)
    cot = rand(1, sum(lengths), DIM, seed=5)

    m = make()
    xp = x.clone().requires_grad_(True)
    packed = m(xp, seq_idx=seq_idx_from_cu_seqlens(cu))
    (packed * cot).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in m.named_parameters()}

    m.zero_grad()
    xs = x.clone().requires_grad_(True)
    outs = [m(xs[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    separate = torch.cat(outs, dim=1)
    (separate * cot).sum().backward()

    torch.testing.assert_close(packed, separate, **TOL)
    torch.testing.assert_close(xp.grad, xs.grad, **TOL)
    for n, p in m.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, **TOL, msg=lambda s: f"{n}: {s}")


def test_causality():
    m = make()
    x = rand(2, 17, DIM, seed=6)
    with torch.no_grad():
        y = m(x)
        x2 = x.clone()
        x2[:, 9] += 1.0
        y2 = m(x2)
    torch.testing.assert_close(y2[:, :9], y[:, :9], atol=0, rtol=0)
    assert (y2[:, 9] - y[:, 9]).abs().max() > 1e-6


def test_gradients_reach_all_parameters():
    m = make()
    x = rand(2, 11, DIM, seed=7).requires_grad_(True)
    m(x).square().sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
    assert x.grad.abs().max() > 0


def test_state_is_constant_size_and_reorders():
    m = make()
    assert m.state_numbers_per_token() is None
    state = m.allocate_state(3, 10)
    assert isinstance(state, Mamba2State)
    own = (m.conv_kernel - 1) * m.conv_dim * 8 + (m.conv_kernel - 1) * 8 + m.num_heads * m.head_dim * m.state_dim * 8
    assert state.nbytes_per_sequence() == own + 10 * 8 + 8  # + the shared bookkeeping (seq ids, next_pos)

    x = rand(3, 10, DIM, seed=8)
    with torch.no_grad():
        full = m(x)
        m(x[:, :6], state=state)
        index = torch.tensor([2, 0, 1])
        state.reorder(index)
        tail = m(x[index, 6:], state=state)
    torch.testing.assert_close(tail, full[index, 6:], **TOL)


def test_float32_and_bfloat16_match_float64():
    """Low-precision layers (weights cast too) stay close to float64, relative to the output's scale:
    measured max errors over five seeds 2.3e-7 (float32) and 9.5e-3 (bfloat16, mostly its weights' rounding)."""
    m = make()
    x = rand(2, 13, DIM, seed=9)
    with torch.no_grad():
        want = m(x)
        got32 = m.float()(x.float())
        gotbf = m.bfloat16()(x.bfloat16())
    assert got32.dtype == torch.float32 and gotbf.dtype == torch.bfloat16
    scale = want.abs().max()
    assert (got32.double() - want).abs().max() <= 2e-6 * scale
    assert (gotbf.double() - want).abs().max() <= 5e-2 * scale


def test_init():
    m = Mamba2(32, state_dim=16, expand=2, head_dim=16, dt_min=1e-3, dt_max=0.1)
    assert m.num_heads == 4 and m.d_inner == 64
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert ((-m.A_log.exp() <= -1) & (-m.A_log.exp() >= -16)).all()
    assert m.in_proj.out_features == 2 * 64 + 2 * 16 + 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(head_dim=24), "head_dim"),
    (dict(head_dim=8, num_groups=3), "num_groups"),
    (dict(expand=0), "expand"),
    (dict(state_dim=0), "state_dim"),
    (dict(conv_kernel=0), "conv_kernel"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min"),
    (dict(backends={"sdd": "chunked"}), "unknown op 'sdd'.*ssd"),
    (dict(backends={"ssd": "fast"}), "unknown backend 'fast'.*chunked"),
    (dict(backends={"attention": "reference"}), "does not call.*ssd"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2(DIM, **{"head_dim": 8, **kwargs})


def test_state_errors():
    m = make()
    state = m.allocate_state(2, 4)
    with pytest.raises(ValueError, match="max_len"):
        m(rand(2, 5, DIM), state=state)
    with pytest.raises(ValueError, match="batch"):
        m(rand(3, 1, DIM), state=state)


def test_norms():
    x, z = rand(2, 3, 12, seed=10), rand(2, 3, 12, seed=11)
    torch.testing.assert_close(RMSNorm(12)(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt(), **TOL)
    g = x * torch.nn.functional.silu(z)
    halves = [h / h.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() for h in g.split(6, dim=-1)]
    torch.testing.assert_close(GatedRMSNorm(12, group_size=6)(x, z), torch.cat(halves, dim=-1), **TOL)
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(12, group_size=5)


def test_reused_segment_id_is_a_new_segment():
    """A change of id resets, even back to an id seen before (ids 0 0 1 0 0 == ids 0 0 1 2 2)."""
    m = make()
    x = rand(1, 9, DIM, seed=12)
    reused = torch.tensor([[0, 0, 0, 1, 0, 0, 0, 0, 0]])
    renumbered = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 2]])
    with torch.no_grad():
        want = m(x, seq_idx=renumbered)
        torch.testing.assert_close(m(x, seq_idx=reused), want, **TOL)
        torch.testing.assert_close(decode_in_chunks(m, x, [1] * 9, reused), want, **TOL)
