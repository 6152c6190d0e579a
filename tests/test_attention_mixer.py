"""The attention mixer: decoding == full forward, padding, packing, causality, window, errors.

Everything runs in float64 and is compared to 1e-10: the paths compute the same sums.
"""

from __future__ import annotations

import pytest
import torch

from blocks.attention import Attention, AttentionState
from kernels.packing import seq_idx_from_cu_seqlens, seq_idx_from_padding

TOL = dict(atol=2e-14, rtol=2e-14)  # float64: about 10x the largest difference these checks show
D = 16

CONFIGS = {
    "mha": dict(num_heads=2),
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "mqa-norope": dict(num_heads=4, num_kv_heads=1, rope=False),
    "window4": dict(num_heads=4, num_kv_heads=2, window=4),
    "window1": dict(num_heads=2, window=1),
}


def make(backend: str = "reference", **kwargs) -> Attention:
    torch.manual_seed(0)
    return Attention(D, backends={"attention": backend}, **kwargs).double()


def x_of(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def run_chunks(mixer: Attention, x: torch.Tensor, sizes: list[int], seq_idx: torch.Tensor | None = None,
               max_len: int | None = None) -> torch.Tensor:
    """Feed x through a fresh state in chunks of the given sizes (the last one repeats until the end)."""
    B, T, _ = x.shape
    state = mixer.allocate_state(B, max_len or T)
    outs, t, i = [], 0, 0
    while t < T:
        n = min(sizes[min(i, len(sizes) - 1)], T - t)
        outs.append(mixer(x[:, t:t + n], seq_idx=None if seq_idx is None else seq_idx[:, t:t + n], state=state))
        t, i = t + n, i + 1
    assert state.length == T
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_decoding_matches_full_forward(config, backend):
    mixer = make(backend, **CONFIGS[config])
    x = x_of(2, 13)
    with torch.no_grad():
        full = mixer(x)
        for sizes in ([1], [3], [5], [7, 1], [13]):  # token by token, chunked prefill, prefill + decode
            torch.testing.assert_close(run_chunks(mixer, x, sizes, max_len=20), full, **TOL, msg=f"chunks {sizes}")


def test_backend_choice_does_not_change_the_result():
    x = x_of(2, 11)
    for kwargs in CONFIGS.values():
        torch.testing.assert_close(make("sdpa", **kwargs)(x), make("reference", **kwargs)(x), **TOL)


@pytest.mark.parametrize("config", ["gqa", "window4"])
def test_left_padded_batch_equals_each_row_alone(config):
    mixer = make(**CONFIGS[config])
    lengths, T, extra = torch.tensor([5, 9, 2]), 9, 4
    x = x_of(3, T + extra)
    seq_idx = seq_idx_from_padding(lengths, T)
    with torch.no_grad():
        padded = mixer(x[:, :T], seq_idx=seq_idx)
        state = mixer.allocate_state(3, T + extra)
        stepped = [mixer(x[:, :T], seq_idx=seq_idx, state=state)]
        stepped += [mixer(x[:, T + i:T + i + 1], state=state) for i in range(extra)]  # continues segment 0
        stepped = torch.cat(stepped, dim=1)
        for b, n in enumerate(lengths.tolist()):
            alone = mixer(x[b:b + 1, T - n:])
            torch.testing.assert_close(padded[b:b + 1, T - n:], alone[:, :n], **TOL)
            torch.testing.assert_close(stepped[b:b + 1, T - n:], alone, **TOL)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("config", ["gqa", "window4"])
def test_packed_equals_separate_forward_and_gradients(config, backend):
    mixer = make(backend, **CONFIGS[config])
    lengths = [4, 1, 6, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    seq_idx = seq_idx_from_cu_seqlens(cu)
    x = x_of(1, sum(lengths)).requires_grad_(True)
    cot = torch.randn(1, sum(lengths), D, dtype=torch.float64)

    packed = mixer(x, seq_idx=seq_idx)
    params = list(mixer.parameters())
    grads = torch.autograd.grad((packed * cot).sum(), [x, *params])

    docs = [x.detach()[:, a:b].clone().requires_grad_(True) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    outs = [mixer(doc) for doc in docs]
    torch.testing.assert_close(packed, torch.cat(outs, dim=1), **TOL)
    sep = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot.split(lengths, dim=1))), [*docs, *params])
    torch.testing.assert_close(grads[0], torch.cat(sep[:len(docs)], dim=1), **TOL)
    for g, s in zip(grads[1:], sep[len(docs):]):
        torch.testing.assert_close(g, s, **TOL)


@pytest.mark.parametrize("config", ["gqa", "window4"])
def test_packed_chunked_prefill_matches_packed_forward(config):
    """Chunks that cross document boundaries, with a state: RoPE positions restart per document."""
    mixer = make(**CONFIGS[config])
    cu = torch.tensor([0, 4, 5, 11, 14])
    seq_idx = seq_idx_from_cu_seqlens(cu).expand(2, -1).contiguous()
    x = x_of(2, 14)
    with torch.no_grad():
        full = mixer(x, seq_idx=seq_idx)
        for sizes in ([1], [3], [5]):
            torch.testing.assert_close(run_chunks(mixer, x, sizes, seq_idx), full, **TOL, msg=f"chunks {sizes}")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_causal(config):
    mixer = make(**CONFIGS[config])
    x = x_of(2, 12)
    t0 = 7
    y = x.clone()
    y[:, t0:] += torch.randn_like(y[:, t0:])
    with torch.no_grad():
        a, b = mixer(x), mixer(y)
    torch.testing.assert_close(a[:, :t0], b[:, :t0], **TOL)
    assert not torch.allclose(a[:, t0:], b[:, t0:])


def test_window_limits_the_context():
    """With window w, output t depends on inputs t-w+1..t only."""
    mixer = make(num_heads=2, window=3)
    x = x_of(1, 10)
    x_grad = x.clone().requires_grad_(True)
    mixer(x_grad)[0, 8].sum().backward()
    touched = x_grad.grad[0].abs().sum(-1) > 0
    assert touched.tolist() == [False] * 6 + [True] * 3 + [False]


def test_state_sizes_and_ring_buffer():
    full, windowed = make(num_heads=4, num_kv_heads=2), make(num_heads=4, num_kv_heads=2, window=4)
    assert full.state_numbers_per_token() == 2 * 2 * 4
    assert windowed.state_numbers_per_token() is None
    s_full, s_win = full.allocate_state(3, 50), windowed.allocate_state(3, 50)
    assert isinstance(s_full, AttentionState)
    assert s_full.k.shape == (3, 50, 2, 4) and s_win.k.shape == (3, 3, 2, 4)
    assert s_full.k.dtype == torch.float64 and s_win.v.dtype == torch.float64
    with torch.no_grad():  # the ring wraps many times
        torch.testing.assert_close(run_chunks(windowed, x_of(3, 50), [1, 2, 5]), windowed(x_of(3, 50)), **TOL)
    with pytest.raises(ValueError, match="max_len=50"):
        full(x_of(3, 51), state=s_full)


def test_state_reorder_for_beam_search():
    mixer = make(**CONFIGS["gqa"])
    x = x_of(3, 8)
    index = torch.tensor([2, 0, 2])
    with torch.no_grad():
        state = mixer.allocate_state(3, 8)
        mixer(x[:, :5], state=state)
        state.reorder(index)
        tail = mixer(x[index, 5:], state=state)
        torch.testing.assert_close(tail, mixer(x[index])[:, 5:], **TOL)


def test_projection_options():
    """qkv_bias adds biases to q/k/v (Sessa's forward branch has them); out_proj=False returns the
    heads' outputs concatenated, i.e. an identity out_proj."""
    mixer = make(num_heads=2, num_kv_heads=1, qkv_bias=True, out_proj=False)
    assert {n for n, _ in mixer.named_parameters()} == {f"{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")}
    with_out = make(num_heads=2, num_kv_heads=1, qkv_bias=True)
    with torch.no_grad():
        with_out.load_state_dict({**mixer.state_dict(), "out_proj.weight": torch.eye(D, dtype=torch.float64)})
        x = x_of(2, 6)
        torch.testing.assert_close(mixer(x), with_out(x), **TOL)
        torch.testing.assert_close(run_chunks(mixer, x, [2]), mixer(x), **TOL)
        mixer.v_proj.bias.add_(1.0)  # a shared value offset passes through the softmax average unchanged
        torch.testing.assert_close(mixer(x), with_out(x) + 1.0, **TOL)


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_heads=3.*dim=16"):
        Attention(16, num_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads=3.*num_heads=4"):
        Attention(16, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope=True.*head dim"):
        Attention(6, num_heads=2)
    Attention(6, num_heads=2, rope=False)  # odd head dim is fine without RoPE
    with pytest.raises(ValueError, match="window"):
        Attention(16, window=0)
    with pytest.raises(ValueError, match="unknown op 'atention'.*attention"):
        Attention(16, backends={"atention": "sdpa"})
    with pytest.raises(ValueError, match="op 'ssd', which this mixer does not call"):
        Attention(16, backends={"ssd": "reference"})
    with pytest.raises(ValueError, match=r"backends\['attention'\]: unknown backend 'spda'.*valid: auto, .*sdpa"):
        Attention(16, backends={"attention": "spda"})
    assert Attention(16).ops == {"attention": "auto"}
