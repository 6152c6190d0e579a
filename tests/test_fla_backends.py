"""The flash-linear-attention (FLA) backends' argument mapping, on CPU.

FLA's kernels need a GPU, so here its four chunked entry points are replaced by stand-ins written
from their documented contracts (FLA 0.6 docstrings and code): (B, T, H, d) layout, natural-log
decays, `scale` multiplying q, states (N, H, dk, dv) in float32, `cu_seqlens` only with B = 1 and
then one initial / final state per sequence, chunk_gla's g shaped like q, chunk_simple_gla's g per
head or None, chunk_delta_rule refusing float32, chunk_gated_delta_rule taking (q, k, v, g, beta).
The backends run through the stand-ins (float64, and bfloat16 for the half-precision-only path)
and must equal `reference`, forward and every gradient, on every mapping path: g per key channel,
per head and none; initial and final states; packed rows (several per batch row, B > 1, left
padding, ids not starting at 0) with initial states; scale. On CUDA the conformance suite runs the
real library; tests/test_fla_interpreter.py runs it in Triton's CPU interpreter when installed.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import kernels.fla_utils as fla_utils
from kernels.delta_rule import delta_rule
from kernels.linear_attention import linear_attention
from kernels.packing import seq_idx_from_padding
from tests.cases import seed_of

TOL = {torch.float64: dict(atol=1e-11, rtol=1e-11), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# ---------------------------------------------------------------- FLA stand-ins
def _state_dtype(q):
    """FLA keeps states in float32 (these tests also run float64 inputs through the stand-ins)."""
    return torch.promote_types(q.dtype, torch.float32)


def _sequences(B, T, cu_seqlens, cu_seqlens_cpu):
    """(row, start, end) of each sequence, as FLA reads cu_seqlens (B must be 1) or the batch."""
    if cu_seqlens is None:
        assert cu_seqlens_cpu is None
        return [(b, 0, T) for b in range(B)]
    assert B == 1, "FLA: the batch size is expected to be 1 when using cu_seqlens"
    assert cu_seqlens.dtype == torch.long and cu_seqlens.ndim == 1, "cu_seqlens: a LongTensor of shape [N+1]"
    assert cu_seqlens_cpu is None or (cu_seqlens_cpu.device.type == "cpu" and torch.equal(cu_seqlens_cpu, cu_seqlens.cpu()))
    cu = cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == T and all(a < b for a, b in zip(cu, cu[1:]))
    return [(0, a, b) for a, b in zip(cu, cu[1:])]


def _recurrence(q, k, v, decay, beta, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu):
    """Per sequence, from its initial state (work in float64 or float32):
    S_t = exp(decay_t) S_{t-1} (+ k_t v_t^T, or the delta rule's beta_t k_t (v_t - S'^T k_t)^T); o_t = (scale q_t)^T S_t.
    decay: (B, T, H, dk) or None; beta: (B, T, H) or None (linear attention)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    seqs = _sequences(B, T, cu_seqlens, cu_seqlens_cpu)
    work = _state_dtype(q)
    if initial_state is not None:
        assert initial_state.shape == (len(seqs), H, K, V), "initial_state: [N, H, K, V]"
    out = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, start, end) in enumerate(seqs):
        S = torch.zeros(H, K, V, dtype=work) if initial_state is None else initial_state[n].to(work)
        for t in range(start, end):
            qt, kt, vt = q[b, t].to(work) * scale, k[b, t].to(work), v[b, t].to(work)
            if decay is not None:
                S = torch.exp(decay[b, t].to(work))[..., None] * S
            if beta is None:
                S = S + kt[:, :, None] * vt[:, None, :]
            else:
                error = vt - torch.einsum("hk,hkv->hv", kt, S)
                S = S + beta[b, t].to(work)[:, None, None] * kt[:, :, None] * error[:, None, :]
            out[b][t] = torch.einsum("hk,hkv->hv", qt, S)
        finals.append(S)
    o = torch.stack([torch.stack(row) for row in out])
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              cu_seqlens=None, cu_seqlens_cpu=None):
    assert not state_v_first
    assert q.shape == k.shape == g.shape, "q, k, g must have the same shape"
    assert v.shape == (*q.shape[:3], v.shape[-1])
    assert initial_state is None or initial_state.dtype == _state_dtype(q), "initial_state must be in float32"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _recurrence(q, k, v, g, None, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu)


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    assert not state_v_first and g_gamma is None and not kwargs
    assert g is None or g.shape == q.shape[:3], "g: forget gates of shape [B, T, H]"
    decay = None if g is None else g[..., None].expand(q.shape)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return _recurrence(q, k, v, decay, None, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu)


def _l2norm(q, k, use_qk_l2norm_in_kernel):
    return (F.normalize(q, dim=-1), F.normalize(k, dim=-1)) if use_qk_l2norm_in_kernel else (q, k)


def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    assert q.dtype == k.dtype == v.dtype
    assert q.dtype != torch.float32, "ChunkDeltaRuleFunction does not support float32"
    assert beta.ndim == 3 and beta.shape == q.shape[:3]
    assert kwargs.get("chunk_size", 64) in (16, 32, 64)
    q, k = _l2norm(q, k, use_qk_l2norm_in_kernel)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return _recurrence(q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                           state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None,
                           cp_context=None, **kwargs):
    assert not (use_beta_sigmoid_in_kernel or allow_neg_eigval or state_v_first or kwargs.get("use_gate_in_kernel"))
    assert chunk_indices is None and cp_context is None
    assert q.shape[2] == k.shape[2] and v.shape[2] == q.shape[2], "no grouped value heads here"
    assert g.shape == beta.shape == q.shape[:3], "g and beta: [B, T, HV]"
    q, k = _l2norm(q, k, use_qk_l2norm_in_kernel)
    decay = g[..., None].expand(q.shape)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return _recurrence(q, k, v, decay, beta, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu)


@pytest.fixture
def fake_fla(monkeypatch):
    entry = {"fla.ops.gla": chunk_gla, "fla.ops.simple_gla": chunk_simple_gla,
             "fla.ops.delta_rule": chunk_delta_rule, "fla.ops.gated_delta_rule": chunk_gated_delta_rule}
    calls = []

    def recorded(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return wrapper

    for name in ["fla", "fla.ops", *entry]:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        if name in entry:
            setattr(module, entry[name].__name__, recorded(entry[name]))
        monkeypatch.setitem(sys.modules, name, module)
    return calls


# ---------------------------------------------------------------- the mapping, every path
SEGMENTS = {  # (B, T) -> seq_idx
    "packed": lambda B, T: torch.tensor([0] * 4 + [1] + [2] * (T - 5)).expand(B, T),
    "rows-differ": lambda B, T: torch.stack([torch.tensor([0] * 4 + [1] + [2] * (T - 5)),
                                             torch.tensor([7] * (T - 3) + [8] * 3)])[:B],
    "left-padded": lambda B, T: seq_idx_from_padding(torch.tensor([T, 3])[:B], T),
}
CASES = {
    "plain": dict(),
    "final": dict(final=True),
    "init-final": dict(init=True, final=True),
    "scale": dict(scale=0.3, init=True),
    "packed": dict(seq="packed"),
    "packed-init-final": dict(seq="packed", init=True, final=True),
    "rows-differ-init-final": dict(seq="rows-differ", init=True, final=True),
    "left-padded-init-final": dict(seq="left-padded", init=True, final=True),
}


def _inputs(op, g_kind, c, dtype, B=2, T=11, H=2, dk=4, dv=6):
    gen = torch.Generator().manual_seed(seed_of(f"{op}-{g_kind}-{sorted(c.items())}-{dtype}"))
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)  # noqa: E731
    logsig = lambda *s: F.logsigmoid(torch.randn(*s, generator=gen, dtype=torch.float64) + 1).to(dtype).requires_grad_(True)  # noqa: E731
    q, v = r(B, T, H, dk), r(B, T, H, dv)
    k = F.normalize(torch.randn(B, T, H, dk, generator=gen, dtype=torch.float64), dim=-1).to(dtype).requires_grad_(True)
    args = [q, k, v]
    if op == "delta_rule":
        args.append(torch.rand(B, T, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True))
    args.append({"key": lambda: logsig(B, T, H, dk), "head": lambda: logsig(B, T, H), None: lambda: None}[g_kind]())
    kw = dict(chunk_size=5, return_final_state=c.get("final", False))
    if "scale" in c:
        kw["scale"] = c["scale"]
    if c.get("init"):
        kw["initial_state"] = r(B, H, dk, dv)
    if "seq" in c:
        kw["seq_idx"] = SEGMENTS[c["seq"]](B, T)
    return args, kw


def _check(op, args, kw, tol):
    leaves = [a for a in args if a is not None] + ([kw["initial_state"]] if "initial_state" in kw else [])
    got = op.backends["fla"].fn(*args, **kw)
    want = op.backends["reference"].fn(*args, **kw)
    got, want = (o if isinstance(o, tuple) else (o,) for o in (got, want))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)
    cots = [torch.randn(w.shape, dtype=torch.float64).to(w.dtype) for w in want]
    grads = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, cots)), leaves)
    ref_grads = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), leaves)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("g_kind", ["key", "head", None], ids=["g-key", "g-head", "no-g"])
def test_linear_attention_mapping(g_kind, name, fake_fla):
    args, kw = _inputs("linear_attention", g_kind, CASES[name], torch.float64)
    _check(linear_attention, args, kw, TOL[torch.float64])
    assert fake_fla == ["chunk_gla" if g_kind == "key" else "chunk_simple_gla"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("g_kind", ["head", None], ids=["g-head", "no-g"])
def test_delta_rule_mapping(g_kind, name, fake_fla):
    """float64 (as float32): chunk_gated_delta_rule, with g = 0 when there is no g."""
    args, kw = _inputs("delta_rule", g_kind, CASES[name], torch.float64)
    _check(delta_rule, args, kw, TOL[torch.float64])
    assert fake_fla == ["chunk_gated_delta_rule"]


@pytest.mark.parametrize("name", ["plain", "init-final", "rows-differ-init-final"])
def test_delta_rule_half_precision_without_g(name, fake_fla):
    """bfloat16 without g: chunk_delta_rule (half precision only), against reference in bfloat16."""
    args, kw = _inputs("delta_rule", None, CASES[name], torch.bfloat16)
    _check(delta_rule, args, kw, TOL[torch.bfloat16])
    assert fake_fla == ["chunk_delta_rule"]


def test_varlen_segments_of_several_rows():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [5, 5, 5, 5, 5], [-1, 0, 0, 2, 3]])
    packed = fla_utils.Varlen.of(seq_idx)
    assert packed.cu_seqlens.tolist() == [0, 2, 5, 10, 11, 13, 14, 15]
    assert packed.first.tolist() == [0, 2, 3] and packed.last.tolist() == [1, 2, 6]
    h0 = torch.arange(3.0).reshape(3, 1, 1, 1) + 1
    assert packed.initial_states(h0).flatten().tolist() == [1, 0, 2, 3, 0, 0, 0]
    assert packed.final_states(torch.arange(7.0).reshape(7, 1, 1, 1)).flatten().tolist() == [1, 2, 6]


# ---------------------------------------------------------------- what they decline, and why
@pytest.mark.parametrize("op_name", ["linear_attention", "delta_rule"])
def test_fla_declines_with_reasons(op_name, monkeypatch, fake_fla):
    op = {"linear_attention": linear_attention, "delta_rule": delta_rule}[op_name]
    backend = op.backends["fla"]
    args, kw = _inputs(op_name, "head", {}, torch.float32)
    assert backend.supports(*args, **kw) == "needs CUDA tensors; got ['cpu']"
    q = torch.randn(1, 3, 2, 8)
    assert "float64 not supported" in fla_utils.input_reason(q.double(), q)
    assert "odd head dims in bfloat16" in fla_utils.input_reason(torch.randn(1, 3, 2, 5).bfloat16(), q)
    assert fla_utils.input_reason(torch.randn(1, 3, 2, 5), torch.randn(1, 3, 2, 3)) is None  # float32: any dims
    assert fla_utils.auto() is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "inside torch.compile" in fla_utils.auto()


def test_fla_probe(monkeypatch, fake_fla):
    monkeypatch.setattr(fla_utils.importlib.util, "find_spec", lambda name: None)
    assert fla_utils.probe("fla.ops.gla").startswith("flash-linear-attention not installed (pip install")
    monkeypatch.setattr(fla_utils.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fla_utils.probe("fla.ops.gla") == "needs CUDA"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for installed, want in (((0, 6), None), ((0, 5), "flash-linear-attention 0.5 installed; this backend needs >=0.6,<0.7"),
                            ((0, 7), "flash-linear-attention 0.7 installed; this backend needs >=0.6,<0.7")):
        monkeypatch.setattr(fla_utils, "_installed_version", lambda v=installed: v)
        assert fla_utils.probe("fla.ops.gla") == want
    monkeypatch.setattr(fla_utils, "_installed_version", lambda: (0, 6))

    def import_module(name):
        raise ModuleNotFoundError("No module named 'triton'")
    monkeypatch.setattr(fla_utils.importlib, "import_module", import_module)
    assert fla_utils.probe("fla.ops.gla") == "cannot import fla.ops.gla: ModuleNotFoundError: No module named 'triton'"


def test_delta_rule_declines_large_key_dim(monkeypatch):
    monkeypatch.setattr(fla_utils, "supports", lambda *a, **k: None)  # as if on a GPU
    q, v = torch.randn(1, 3, 2, 300), torch.randn(1, 3, 2, 8)
    assert "dk > 256 not supported" in delta_rule.backends["fla"].supports(q, q, v, torch.rand(1, 3, 2))
