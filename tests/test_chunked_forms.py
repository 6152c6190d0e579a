"""The two intra-chunk forms of the `chunked` linear_attention backend with per-key-channel decays
(factored when every chunk's decay fits float32, pairwise otherwise) both equal `reference`,
forward and gradients, with segments and an initial state; and the form is chosen as documented."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.linear_attention import chunked, linear_attention


def _inputs(strength: float, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B, T, H, dk, dv = 2, 45, 2, 5, 3
    q, k = (torch.randn(B, T, H, dk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, dv, generator=g, dtype=dtype)
    logits = torch.randn(B, T, H, dk, generator=g, dtype=dtype) * 2 - strength
    decay = F.logsigmoid(logits)  # strength 0: about -0.7 per step; 12: about -12 per step
    seq_idx = torch.tensor([[0] * 20 + [1] * 25, [0] * 7 + [1] * 30 + [2] * 8])
    state = torch.randn(B, H, dk, dv, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, decay, state)], seq_idx


@pytest.mark.parametrize("strength, form", [(0.0, True), (12.0, False)])
def test_both_forms_equal_the_reference(strength, form):
    (q, k, v, decay, state), seq_idx = _inputs(strength, seed=int(strength))
    chunk = 16
    assert chunked._factorable(decay, chunk) is form  # strong decays take the pairwise form
    outs = {}
    for backend in ("chunked", "reference"):
        o, final = linear_attention(q, k, v, decay, initial_state=state, seq_idx=seq_idx, chunk_size=chunk,
                                    return_final_state=True, backend=backend)
        grads = torch.autograd.grad((o * torch.cos(o)).sum() + final.square().sum(), (q, k, v, decay, state))
        outs[backend] = (o, final, *grads)
    for got, want in zip(outs["chunked"], outs["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_the_bound_is_per_chunk_and_channel():
    decay = torch.full((1, 64, 1, 3), -0.5, dtype=torch.float64)
    assert chunked._factorable(decay, 64)  # 64 * 0.5 = 32 <= 60
    decay[0, 10:20, 0, 1] = -4.0  # one channel of the first chunk: 54 * 0.5 + 10 * 4 = 67 > 60
    assert not chunked._factorable(decay, 64)
    assert chunked._factorable(decay, 16)  # the same steps in chunks of 16: at most 6 * 4 + 10 * 0.5 = 29
