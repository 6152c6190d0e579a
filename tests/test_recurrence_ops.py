"""The ops with a matrix state per head, `linear_attention` and `delta_rule`, beyond the conformance
suite (which checks `chunked` against `reference`): the reference against independent statements
of the same maths (dense closed forms), decoding step by step against the full pass, extreme
decays, automatic selection, and errors that name the argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.delta_rule import delta_rule
from kernels.linear_attention import linear_attention
from kernels.packing import same_segment

TOL = dict(rtol=2e-14, atol=2e-14)  # float64: about 10x the largest difference these checks show
BACKENDS = ["reference", "chunked"]


def inputs(B=2, T=13, H=2, dk=4, dv=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    q, v = torch.randn(B, T, H, dk, dtype=dtype), torch.randn(B, T, H, dv, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, dk, dtype=dtype), dim=-1)
    beta = torch.sigmoid(torch.randn(B, T, H, dtype=dtype))
    g_key = F.logsigmoid(torch.randn(B, T, H, dk, dtype=dtype) * 2 + 2)
    g_head = F.logsigmoid(torch.randn(B, T, H, dtype=dtype) * 2 + 2)
    S0 = torch.randn(B, H, dk, dv, dtype=dtype)
    return q, k, v, beta, g_key, g_head, S0


SEQ_IDX = torch.tensor([[0] * 4 + [1] + [2] * 8, [0] * 13])  # segments of 4, 1 and 8 steps; one segment


# ---------------------------------------------------------------------------- independent statements

def dense_linear_attention(q, k, v, g, scale, S0, seq_idx):
    """o_i = scale sum_{j <= i, same segment} sum_d q_id k_jd exp(G_id - G_jd) v_j
             + scale sum_d q_id exp(G_id) (S0 v-rows)_d   (step i in step 0's segment),
    G the inclusive cumulative sum of g over time: the parallel (attention) form, O(T^2)."""
    B, T, H, dk = q.shape
    G = torch.zeros(B, T, H, dk, dtype=q.dtype) if g is None else g.expand(B, T, H, dk).cumsum(dim=1)
    decay = torch.exp(G[:, :, None] - G[:, None, :])  # (B, i, j, H, dk)
    visible = torch.ones(T, T, dtype=torch.bool).tril()[None] & same_segment(seq_idx, seq_idx)  # (B, i, j)
    scores = torch.einsum("bihd,bjhd,bijhd->bhij", q, k, decay).masked_fill(~visible[:, None], 0.0)
    o = scale * torch.einsum("bhij,bjhv->bihv", scores, v)
    first = (seq_idx == seq_idx[:, :1])[:, :, None, None]  # steps in step 0's segment read S0
    return o + scale * torch.where(first, torch.einsum("bihd,bhdv->bihv", q * torch.exp(G), S0), 0.0)


def transition_delta_rule(q, k, v, beta, g, scale, S0, seq_idx):
    """S_i = A_i ... A_1 S0 + sum_{j <= i} (A_i ... A_{j+1}) beta_j k_j v_j^T with the explicit dk x dk
    transitions A_t = exp(g_t) (I - beta_t k_t k_t^T) (A_t = 0 where a segment starts): products of
    matrices, not the update form of the reference."""
    B, T, H, dk = q.shape
    eye = torch.eye(dk, dtype=q.dtype)
    decay = torch.ones(B, T, H, dtype=q.dtype) if g is None else torch.exp(g)
    A = decay[..., None, None] * (eye - beta[..., None, None] * k[..., :, None] * k[..., None, :])  # (B, T, H, dk, dk)
    A[:, 1:] *= (seq_idx[:, 1:] == seq_idx[:, :-1])[:, :, None, None, None]
    out = []
    for i in range(T):
        S = S0.clone()
        for t in range(i + 1):
            S = A[:, t] @ S
        for j in range(i + 1):
            P = eye.expand(B, H, dk, dk)
            for t in range(j + 1, i + 1):
                P = A[:, t] @ P
            S = S + P @ (beta[:, j, :, None, None] * k[:, j, :, :, None] * v[:, j, :, None, :])
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, i], S))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("gate", ["key", "head", None])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention_equals_its_parallel_form(backend, gate):
    q, k, v, _, g_key, g_head, S0 = inputs()
    g = {"key": g_key, "head": g_head, None: None}[gate]
    expected = dense_linear_attention(q, k, v, None if g is None else (g if g.ndim == 4 else g[..., None]), 0.7, S0,
                                      SEQ_IDX)
    got = linear_attention(q, k, v, g, scale=0.7, initial_state=S0, seq_idx=SEQ_IDX, chunk_size=3, backend=backend)
    torch.testing.assert_close(got, expected, **TOL)


def test_retnet_decay_is_a_power_of_gamma():
    """A constant per-head decay gamma: o_n = scale sum_{m <= n} gamma^(n - m) (q_n . k_m) v_m (RetNet's parallel form)."""
    q, k, v, *_ = inputs(B=1, T=9, H=2)
    gamma = torch.tensor([1 - 2 ** -5, 1 - 2 ** -6], dtype=torch.float64)
    n = torch.arange(9, dtype=torch.float64)
    D = (gamma[:, None, None] ** (n[:, None] - n[None, :])) * (n[:, None] >= n[None, :])  # (H, n, m)
    expected = torch.einsum("bnhd,bmhd,hnm,bmhv->bnhv", q, k, D, v) * 4 ** -0.5
    g = torch.log(gamma).expand(1, 9, 2)
    for backend in BACKENDS:
        torch.testing.assert_close(linear_attention(q, k, v, g, backend=backend), expected, **TOL)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_rule_equals_its_transition_products(backend, gated):
    q, k, v, beta, _, g_head, S0 = inputs(T=9)
    seq_idx = torch.tensor([[0] * 3 + [1] + [2] * 5, [0] * 9])
    g = g_head if gated else None
    expected = transition_delta_rule(q, k, v, beta, g, 0.7, S0, seq_idx)
    got = delta_rule(q, k, v, beta, g, scale=0.7, initial_state=S0, seq_idx=seq_idx, chunk_size=4, backend=backend)
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("chunks_per_group", [1, 2])
def test_delta_rule_chunk_groups_carry_the_state_and_gradients(monkeypatch, chunks_per_group):
    """The chunked backend runs its chunks in groups of bounded memory (GROUP_BYTES): with groups of
    one and two chunks, outputs, final state and every gradient equal the reference, segments and
    an initial state included (a segment starts on a group boundary and inside a group)."""
    from kernels.delta_rule import chunked

    q, k, v, beta, _, g, S0 = inputs(T=13)
    B, T, H, dk = q.shape
    C = 2  # 7 chunks: groups of 1 or 2 chunks, the last one partial
    monkeypatch.setattr(chunked, "GROUP_BYTES", chunks_per_group * B * H * C * (C + dk + v.shape[-1]) * 8)
    seq_idx = torch.tensor([[0] * 4 + [1] * 3 + [2] * 6, [0] * 13])
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, g, S0)]
    grads, outs = [], []
    for backend in BACKENDS:
        o, S = delta_rule(*leaves[:5], scale=0.7, initial_state=leaves[5], seq_idx=seq_idx, chunk_size=C,
                          return_final_state=True, backend=backend)
        outs.append((o, S))
        grads.append(torch.autograd.grad((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() + S.sum(), leaves))
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, **TOL)


def test_delta_rule_with_beta_one_stores_the_value_exactly():
    """beta = 1 and a unit key: afterwards the state maps that key to exactly its value (a delta rule write)."""
    q, k, v, _, _, _, S0 = inputs(B=1, T=5)
    beta = torch.ones(1, 5, 2, dtype=torch.float64)
    for backend in BACKENDS:
        _, S = delta_rule(q, k, v, beta, initial_state=S0, return_final_state=True, backend=backend)
        torch.testing.assert_close(torch.einsum("bhk,bhkv->bhv", k[:, -1], S), v[:, -1], **TOL)


# ---------------------------------------------------------------------------- decoding

def _call(op_name, backend, q, k, v, beta, g, **kw):
    if op_name == "linear_attention":
        return linear_attention(q, k, v, g, backend=backend, **kw)
    return delta_rule(q, k, v, beta, g, backend=backend, **kw)


@pytest.mark.parametrize("op_name,gate", [("linear_attention", "key"), ("linear_attention", "head"),
                                          ("linear_attention", None), ("delta_rule", "head"), ("delta_rule", None)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_steps_equal_the_full_pass(op_name, gate, backend):
    """Prefill 5 steps, then T = 1 steps from the state (the decoding path), then a chunk of 4: the
    outputs and the final state equal one pass over the whole sequence, segments included."""
    q, k, v, beta, g_key, g_head, S0 = inputs()
    g = {"key": g_key, "head": g_head, None: None}[gate]
    full, final = _call(op_name, "reference", q, k, v, beta, g, initial_state=S0, seq_idx=SEQ_IDX,
                        return_final_state=True)
    outs, S = [], S0
    for a, b in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 13)]:
        # a piece whose first step starts a new segment gets a zero state (what a mixer's state does)
        keep = (SEQ_IDX[:, a] == SEQ_IDX[:, a - 1]) if a else torch.ones(2, dtype=torch.bool)
        piece = [t[:, a:b] if t is not None else None for t in (q, k, v, beta, g)]
        o, S = _call(op_name, backend, *piece, initial_state=torch.where(keep[:, None, None, None], S, 0.0),
                     seq_idx=SEQ_IDX[:, a:b], return_final_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)
    torch.testing.assert_close(S, final, **TOL)


# ---------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("op_name", ["linear_attention", "delta_rule"])
def test_extreme_decays_stay_finite_and_exact(op_name):
    """Decays of exp(-1000) (underflow to 0) mixed with none at all, in float32: the chunked backend never
    forms exp of a large positive number, so outputs and gradients stay finite and match the reference."""
    q, k, v, beta, _, g_head, _ = inputs(B=1, T=70, dtype=torch.float32)
    g = torch.where(torch.rand(1, 70, 2) < 0.2, -1000.0, 0.0)
    if op_name == "linear_attention":
        g = g[..., None].expand(1, 70, 2, 4).contiguous()
    results = []
    for backend in BACKENDS:
        xs = [t.clone().requires_grad_(True) for t in (q, k, v, beta, g)]
        o = _call(op_name, backend, *xs, chunk_size=16)
        grads = torch.autograd.grad(o.square().sum(), [xs[0], xs[1], xs[2], xs[4]])
        assert torch.isfinite(o).all() and all(torch.isfinite(gr).all() for gr in grads), backend
        results.append((o, grads))
    (o_ref, g_ref), (o, grads) = results
    # float32, about 10x the largest differences measured here (outputs 9.5e-7, gradients 3.1e-5 of values up to 1e2)
    torch.testing.assert_close(o, o_ref, rtol=3e-6, atol=3e-6)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, rtol=3e-5, atol=3e-5)


def test_half_precision_is_computed_in_float32():
    q, k, v, beta, _, g_head, S0 = inputs(T=20)
    for op_name in ("linear_attention", "delta_rule"):
        want = _call(op_name, "reference", q, k, v, beta, g_head, initial_state=S0).float()
        low = [t.bfloat16() for t in (q, k, v, beta, g_head)]
        for backend in BACKENDS:
            o, S = _call(op_name, backend, *low, initial_state=S0.bfloat16(), return_final_state=True)
            assert o.dtype == S.dtype == torch.bfloat16
            torch.testing.assert_close(o.float(), want, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------- dispatch

@pytest.mark.parametrize("op", [linear_attention, delta_rule])
def test_automatic_selection_takes_chunked_from_16_steps(op):
    for T, expected in [(1, "reference"), (15, "reference"), (16, "chunked"), (300, "chunked")]:
        q, k, v, beta, _, g_head, _ = inputs(B=1, T=T)
        args = (q, k, v, g_head) if op is linear_attention else (q, k, v, beta, g_head)
        assert op.select(*args).name == expected, T
    assert "reference is as fast" in op.backends["chunked"].auto_reason(*(t[:, :5] for t in args))


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("change,error,match", [
    (dict(q=torch.zeros(2, 13, 2)), ValueError, r"q must be \(batch, T, heads, dk\); got \(2, 13, 2\)"),
    (dict(k=torch.zeros(2, 13, 2, 5)), ValueError, r"k must be \(batch, T, heads, dk\) = \(2, 13, 2, 4\) like q"),
    (dict(v=torch.zeros(2, 12, 2, 3)), ValueError, r"v must be \(batch, T, heads, dv\) with \(batch, T, heads\) = \(2, 13, 2\)"),
    (dict(v=torch.zeros(2, 13, 2, 3, dtype=torch.float32)), TypeError, "linear_attention: q, k and v must share one dtype"),
    (dict(k=torch.zeros(2, 13, 2, 4, dtype=torch.long)), TypeError, "linear_attention: k must be a floating-point tensor"),
    (dict(g=[0.0]), TypeError, "linear_attention: g must be a torch.Tensor; got list"),
    (dict(g=torch.zeros(2, 13, 2, 3)), ValueError, r"g must be \(batch, T, heads, dk\) = \(2, 13, 2, 4\) \(per key channel\) or"),
    (dict(initial_state=torch.zeros(2, 2, 3, 4)), ValueError, r"initial_state must be \(batch, heads, dk, dv\) = \(2, 2, 4, 3\)"),
    (dict(seq_idx=torch.zeros(2, 12, dtype=torch.long)), ValueError, r"seq_idx must be \(batch, T\) = \(2, 13\); got \(2, 12\)"),
    (dict(seq_idx=torch.zeros(2, 13)), TypeError, r"seq_idx must hold integer segment ids"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int; got chunk_size=0"),
    (dict(scale="big"), TypeError, "scale must be a number or None"),
    (dict(return_final_state=1), TypeError, "return_final_state must be a bool"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention_errors_name_the_argument(backend, change, error, match):
    q, k, v, _, g_key, _, _ = inputs()
    kwargs = dict(q=q, k=k, v=v, g=g_key) | change
    with pytest.raises(error, match=match):
        linear_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), kwargs.pop("g"), backend=backend, **kwargs)


@pytest.mark.parametrize("change,match", [
    (dict(beta=torch.zeros(2, 13)), r"beta must be \(batch, T, heads\) = \(2, 13, 2\); got \(2, 13\)"),
    (dict(g=torch.zeros(2, 13, 2, 4)), r"g must be \(batch, T, heads\) = \(2, 13, 2\) \(a log decay per head\) or None"),
    (dict(k=torch.zeros(2, 13, 2, 5)), r"k must be \(batch, T, heads, dk\)"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_rule_errors_name_the_argument(backend, change, match):
    q, k, v, beta, _, g_head, _ = inputs()
    kwargs = dict(q=q, k=k, v=v, beta=beta, g=g_head) | change
    with pytest.raises(ValueError, match=match):
        delta_rule(*(kwargs[n] for n in ("q", "k", "v", "beta", "g")), backend=backend)


@pytest.mark.parametrize("op_name", ["linear_attention", "delta_rule"])
def test_value_checks_refuse_growing_decays_and_bad_segments(op_name):
    """Off by default (they read the values); with kernels.value_checks on, g > 0, beta outside [0, 1]
    and a segment id that reappears are refused by name, whichever backend is pinned."""
    q, k, v, beta, _, g_head, _ = inputs()
    grow = g_head.clone()
    grow[0, 3, 1] = 0.5
    _call(op_name, "reference", q, k, v, beta, grow)  # accepted without the switch
    broken = SEQ_IDX.clone()
    broken[0, -1] = 0  # segment 0 reappears after segments 1 and 2
    with kernels.value_checks.enabled():
        for backend in BACKENDS:
            with pytest.raises(ValueError, match=rf"{op_name}: g must be <= 0 \(a log decay\); got max g = 0.5"):
                _call(op_name, backend, q, k, v, beta, grow)
            with pytest.raises(ValueError, match="seq_idx: segment id 0 reappears at step 12 of row 0"):
                _call(op_name, backend, q, k, v, beta, g_head, seq_idx=broken)
            if op_name == "delta_rule":
                with pytest.raises(ValueError, match=r"delta_rule: beta must lie in \[0, 1\]"):
                    _call(op_name, backend, q, k, v, beta * 2, g_head)
    assert "value checks" in kernels.get_op(op_name).__doc__


def test_both_ops_are_registered_with_their_backends():
    for name in ("linear_attention", "delta_rule"):
        assert list(kernels.get_op(name).backends) == ["reference", "chunked", "fla"]
