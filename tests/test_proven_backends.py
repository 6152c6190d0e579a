"""The flash_attn and mamba_ssm backends' argument mapping, on CPU (xformers': tests/test_kernels_dispatch.py,
on the same ATTENTION_CASES).

Both libraries need CUDA, so here each is replaced by a stand-in written from its documented
contract (flash-attn's docstrings: bottom-right causal masks, window_size, GQA, varlen cu_seqlens;
mamba_ssm's mamba_chunk_scan_combined docstring and kernels: the state resets where seq_idx
changes and the initial state belongs to segment id 0). The backends run through the stand-ins in
float64 and must equal `reference`, forward and gradients; on CUDA the conformance suite runs the
real libraries.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from einops import repeat

import kernels.attention.flash_attn as fa_backend
import kernels.ssd.mamba_ssm as mamba_backend
from kernels.attention import attention
from kernels.packing import seq_idx_from_cu_seqlens, seq_idx_from_padding
from kernels.ssd import ssd

TOL = dict(atol=5e-15, rtol=5e-15)  # float64: about 10x the largest difference these checks show


# ---------------------------------------------------------------- flash-attn stand-in
def _flash_core(q, k, v, softmax_scale, causal, window_size):
    """One sequence: q (Tq, H, d), k / v (S, Hkv, d) -> (Tq, H, d), masks as documented."""
    Tq, H, d = q.shape
    S, Hkv = k.shape[:2]
    assert H % Hkv == 0, "heads of q must be a multiple of the heads of k/v"
    k, v = (repeat(t, "s g d -> s (g r) d", r=H // Hkv) for t in (k, v))
    scale = 1 / math.sqrt(d) if softmax_scale is None else softmax_scale
    logits = torch.einsum("thd,shd->hts", q, k) * scale
    i = torch.arange(Tq)[:, None] + S - Tq  # bottom-right alignment
    j = torch.arange(S)[None, :]
    keep = torch.ones(Tq, S, dtype=torch.bool)
    if causal:
        keep &= j <= i
    left, right = window_size
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    weights = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)  # empty row -> 0
    return torch.einsum("hts,shd->thd", weights, v)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
    assert q.ndim == k.ndim == v.ndim == 4 and dropout_p == 0.0 and not kwargs
    assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash-attn needs one head dim"
    return torch.stack([_flash_core(q[b], k[b], v[b], softmax_scale, causal, window_size) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
    assert q.ndim == k.ndim == v.ndim == 3 and dropout_p == 0.0 and not kwargs
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32, "cu_seqlens must be int32"
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert cq[-1] == q.shape[0] and ck[-1] == k.shape[0] and len(cq) == len(ck)
    assert max_seqlen_q == max(b - a for a, b in zip(cq, cq[1:])) and max_seqlen_k == max(b - a for a, b in zip(ck, ck[1:]))
    return torch.cat([_flash_core(q[a:b], k[c:e], v[c:e], softmax_scale, causal, window_size)
                      for a, b, c, e in zip(cq, cq[1:], ck, ck[1:])])


@pytest.fixture
def fake_flash_attn(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.__version__ = "2.8.3"
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return module


ATTENTION_CASES = {
    "causal": dict(B=2, Tq=7, S=7, H=4, Hkv=2),
    "one-query": dict(B=2, Tq=1, S=9, H=2, Hkv=2),
    "bottom-right": dict(B=2, Tq=3, S=10, H=4, Hkv=1),
    "window": dict(B=2, Tq=11, S=11, H=2, Hkv=2, window=4),
    "window-bottom-right": dict(B=1, Tq=4, S=12, H=4, Hkv=2, window=3),
    "window-wider-than-keys": dict(B=1, Tq=5, S=5, H=2, Hkv=2, window=9),
    "packed": dict(B=1, Tq=13, S=13, H=4, Hkv=2, cu=[0, 5, 6, 13]),
    "packed-suffix": dict(B=1, Tq=4, S=13, H=2, Hkv=2, cu=[0, 5, 6, 10, 13]),  # first segments unseen
    "packed-window": dict(B=1, Tq=13, S=13, H=2, Hkv=1, cu=[0, 7, 8, 13], window=3),
    "left-padded": dict(B=3, Tq=3, S=8, H=2, Hkv=2, padded=[8, 2, 5]),
}


def _attention_inputs(c, grad):
    B, Tq, S, H, Hkv, d = c["B"], c["Tq"], c["S"], c["H"], c["Hkv"], 8
    kw = {"window": c["window"]} if "window" in c else {}
    if "cu" in c:
        kw["seq_idx"] = seq_idx_from_cu_seqlens(torch.tensor(c["cu"])).expand(B, S)
    if "padded" in c:
        kw["seq_idx"] = seq_idx_from_padding(torch.tensor(c["padded"]), S)
    qkv = [torch.randn(B, n, h, d, dtype=torch.float64, requires_grad=grad) for n, h in ((Tq, H), (S, Hkv), (S, Hkv))]
    return qkv, kw


def assert_attention_equals_reference(backend: str, grad: bool, case: dict) -> None:
    """attention's `backend` through its stand-in equals `reference` in float64, forward and gradients."""
    (q, k, v), kw = _attention_inputs(case, grad)
    with torch.set_grad_enabled(grad):
        got = attention.backends[backend].fn(q, k, v, scale=0.3, **kw)
        want = attention.backends["reference"].fn(q, k, v, scale=0.3, **kw)
    torch.testing.assert_close(got, want, **TOL)
    if grad:
        cot = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad((got * cot).sum(), (q, k, v)), torch.autograd.grad((want * cot).sum(), (q, k, v))):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_flash_attn_mapping(name, grad, fake_flash_attn):
    assert_attention_equals_reference("flash_attn", grad, ATTENTION_CASES[name])


def test_flash_attn_declines_with_reasons(monkeypatch, fake_flash_attn):
    q = torch.randn(1, 3, 2, 8)
    backend = attention.backends["flash_attn"]
    assert "needs CUDA tensors" in backend.supports(q, q, q)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fa_backend._probe() is None
    fake_flash_attn.__version__ = "2.2.5"
    assert "flash-attn 2.2.5 installed; this backend needs >=2.3,<3" == fa_backend._probe()
    monkeypatch.delitem(sys.modules, "flash_attn")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "flash_attn not installed" in fa_backend._probe()


# ---------------------------------------------------------------- mamba_ssm stand-in
def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False):
    """As documented: x (b, l, h, p), dt (b, l, h), A (h,), B / C (b, l, g, n), initial_states (b, h, p, n),
    seq_idx (b, l); the state resets where seq_idx changes, the id before step 0 counting as 0."""
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    assert dt.shape == (b, L, H) and A.shape == (H,) and C.shape == B.shape == (b, L, G, N) and H % G == 0
    assert chunk_size & (chunk_size - 1) == 0 and chunk_size >= 16, "chunk_size: a power of two"
    assert seq_idx is None or (seq_idx.shape == (b, L) and seq_idx.dtype == torch.int32)
    work = torch.float64
    dt = dt.to(work) + (0 if dt_bias is None else dt_bias.to(work))
    dt = (F.softplus(dt) if dt_softplus else dt).clamp(*dt_limit)
    Bh, Ch = (repeat(t.to(work), "b l g n -> b l (g r) n", r=H // G) for t in (B, C))
    h = torch.zeros(b, H, P, N, dtype=work) if initial_states is None else initial_states.to(work)
    prev = torch.zeros(b, dtype=torch.int32)
    ys = []
    for t in range(L):
        keep = torch.ones(b, dtype=work) if seq_idx is None else (seq_idx[:, t] == prev).to(work)
        if seq_idx is not None:
            prev = seq_idx[:, t]
        decay = torch.exp(dt[:, t] * A.to(work)) * keep[:, None]
        h = decay[..., None, None] * h + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t].to(work), Bh[:, t])
        y = torch.einsum("bhpn,bhn->bhp", h, Ch[:, t])
        if D is not None:
            y = y + x[:, t].to(work) * (D.to(work)[:, None] if D.ndim == 1 else D.to(work))
        ys.append(y)
    out = torch.stack(ys, dim=1)
    if z is not None:
        out = out * F.silu(z.to(work))
    out = out.to(x.dtype)
    return (out, h.to(C.dtype)) if return_final_states else out


@pytest.fixture
def fake_mamba_ssm(monkeypatch):
    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.ssd_combined"]
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    modules["mamba_ssm"].__version__ = "2.3.2"
    modules["mamba_ssm.ops.triton.ssd_combined"].mamba_chunk_scan_combined = mamba_chunk_scan_combined
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["mamba_ssm"]


SSD_CASES = {
    "plain": dict(),
    "final-state": dict(final=True),
    "init": dict(init=True, final=True),
    "packed": dict(seq=[0] * 5 + [1] * 1 + [2] * 11),
    "ids-not-from-zero-with-init": dict(seq=[7] * 6 + [8] * 11, init=True, final=True),
    "left-padding-with-init": dict(seq=[-1] * 4 + [0] * 13, init=True, final=True),
}


@pytest.mark.parametrize("name", list(SSD_CASES))
def test_mamba_ssm_mapping(name, fake_mamba_ssm):
    c = SSD_CASES[name]
    b, L, H, P, G, N = 2, 17, 4, 3, 2, 5
    r = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, Bm, Cm = r(b, L, H, P), r(b, L, G, N), r(b, L, G, N)
    dt = F.softplus(torch.randn(b, L, H, dtype=torch.float64)).requires_grad_(True)
    A = (-torch.rand(H, dtype=torch.float64) - 0.5).requires_grad_(True)
    kw = dict(chunk_size=8, return_final_state=c.get("final", False))
    if c.get("init"):
        kw["initial_state"] = r(b, H, P, N)
    if "seq" in c:
        kw["seq_idx"] = torch.tensor(c["seq"]).expand(b, L)
    leaves = [x, dt, A, Bm, Cm] + ([kw["initial_state"]] if "initial_state" in kw else [])
    got = ssd.backends["mamba_ssm"].fn(x, dt, A, Bm, Cm, **kw)
    want = ssd.backends["reference"].fn(x, dt, A, Bm, Cm, **kw)
    got, want = (o if isinstance(o, tuple) else (o,) for o in (got, want))
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, **TOL)
    cots = [torch.randn_like(w) for w in want]
    grads = torch.autograd.grad(sum((g * c_).sum() for g, c_ in zip(got, cots)), leaves)
    ref_grads = torch.autograd.grad(sum((w * c_).sum() for w, c_ in zip(want, cots)), leaves)
    for a, b_ in zip(grads, ref_grads):
        torch.testing.assert_close(a, b_, **TOL)


def test_mamba_ssm_declines_with_reasons(monkeypatch, fake_mamba_ssm):
    x, dt, A, Bm = torch.randn(1, 3, 2, 8), torch.rand(1, 3, 2), -torch.rand(2), torch.randn(1, 3, 1, 4)
    backend = ssd.backends["mamba_ssm"]
    assert "needs CUDA tensors" in backend.supports(x, dt, A, Bm, Bm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mamba_backend._probe() is None
    fake_mamba_ssm.__version__ = "1.2.2"
    assert mamba_backend._probe() == "mamba-ssm 1.2.2 installed; this backend needs >=2.0,<3"
    assert [mamba_backend.chunk_len(c) for c in (4, 64, 100, 256, 1024)] == [64, 64, 128, 256, 256]
