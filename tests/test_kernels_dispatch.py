"""Backend dispatch (kernels.dispatch) and the attention op's backends.

A throwaway op `toy` with three backends exercises the mechanics:
    gpu    priority 20, unavailable ("needs CUDA")
    fast   priority 10, declines float32 inputs
    slow   priority 0, takes anything
"""

from __future__ import annotations

import logging

import pytest
import torch

import kernels
from kernels.attention import attention
from kernels.dispatch import OPS, BackendError, Op, _logged, set_backend, use_backends
from tests.test_proven_backends import ATTENTION_CASES, assert_attention_equals_reference


@pytest.fixture
def toy():
    op = Op("toy")

    @op.register("slow", priority=0)
    def slow(x):
        return "slow"

    @op.register("fast", priority=10,
                 supports=lambda x: "float32 not supported" if x.dtype == torch.float32 else None)
    def fast(x):
        return "fast"

    @op.register("gpu", priority=20, probe=lambda: "needs CUDA")
    def gpu(x):
        return "gpu"

    yield op
    set_backend("toy", None)
    del OPS["toy"]
    _logged.difference_update({key for key in _logged if key[0] == "toy"})  # so each test logs afresh


X64, X32 = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float32)


def test_highest_priority_backend_that_can_run(toy):
    assert toy(X64) == "fast"
    assert toy(X32) == "slow"  # fast declines float32, gpu is unavailable
    assert toy.reasons(X32) == {"gpu": "needs CUDA", "fast": "float32 not supported", "slow": None}


def test_pins_and_their_precedence(toy, monkeypatch):
    assert toy(X64, backend="slow") == "slow"
    assert toy(X64, backend="auto") == "fast"
    monkeypatch.setenv("ZOO_BACKENDS", "attention=sdpa, toy=slow")
    assert toy(X64) == "slow"
    set_backend("toy", "fast")
    assert toy(X64) == "fast"  # set_backend beats the environment
    with use_backends(toy="slow"):
        assert toy(X64) == "slow"  # use_backends beats set_backend
        with use_backends(toy="fast"):
            assert toy(X64) == "fast"  # the innermost scope wins
        assert toy(X64) == "slow"
        assert toy(X64, backend="fast") == "fast"  # a per-call pin beats everything
    assert toy(X64) == "fast"
    set_backend("toy", None)
    assert toy(X64) == "slow"  # back to the environment
    monkeypatch.setenv("ZOO_BACKENDS", "toy")
    with pytest.raises(ValueError, match="ZOO_BACKENDS entry 'toy' must look like op=backend"):
        toy(X64)


@pytest.mark.parametrize("spec,message", [
    ("toy=slow,atention=sdpa", "ZOO_BACKENDS entry 'atention=sdpa': unknown op 'atention'; valid ops: .*attention"),
    ("toy=quick", "ZOO_BACKENDS entry 'toy=quick': unknown backend 'quick' for op 'toy'; valid: auto, slow"),
    ("toy=", "ZOO_BACKENDS entry 'toy=' must look like op=backend"),
])
def test_a_misspelt_environment_pin_is_an_error_naming_it(toy, monkeypatch, spec, message):
    monkeypatch.setenv("ZOO_BACKENDS", spec)
    with pytest.raises(ValueError, match=message):
        toy(X64)


def test_an_exception_inside_a_check_becomes_the_backends_reason(toy):
    def broken(x):
        raise AttributeError("no attribute 'shape'")

    toy.register("broken", priority=30, supports=broken)(lambda x: "broken")
    toy.register("picky", priority=25, auto=broken)(lambda x: "picky")
    assert toy(X64) == "fast"
    assert toy.reasons(X64)["broken"] == "supports check failed: AttributeError: no attribute 'shape'"
    with pytest.raises(BackendError, match="pinned backend 'broken' cannot run \\(supports check failed"):
        toy(X64, backend="broken")
    assert toy(X64, backend="picky") == "picky"  # auto only declines automatic selection


def test_unknown_backend_name_lists_the_valid_ones(toy):
    valid = "valid: auto, slow, fast, gpu"
    with pytest.raises(BackendError, match=f"unknown backend 'quick' for op 'toy'; {valid}"):
        toy(X64, backend="quick")
    with pytest.raises(BackendError, match=valid):
        set_backend("toy", "quick")
    with pytest.raises(BackendError, match=valid):
        with use_backends(toy="quick"):
            pass
    with pytest.raises(KeyError, match="unknown op 'toyy'"):
        set_backend("toyy", "slow")


def test_pinned_backend_that_cannot_run_lists_every_reason(toy):
    with pytest.raises(BackendError) as err:
        toy(X32, backend="fast")
    msg = str(err.value)
    assert "pinned backend 'fast' cannot run (float32 not supported)" in msg
    assert "- gpu (priority 20): needs CUDA" in msg
    assert "- fast (priority 10): float32 not supported" in msg
    assert "- slow (priority 0): ok" in msg
    with pytest.raises(BackendError, match="pinned backend 'gpu' cannot run \\(needs CUDA\\)"):
        toy(X64, backend="gpu")


def test_no_backend_can_run(toy):
    toy.register("slow", supports=lambda x: "never")(lambda x: "slow")
    with pytest.raises(BackendError, match="no backend can run these inputs(.|\n)*slow \\(priority 0\\): never"):
        toy(X32)


def test_choice_is_logged_once(toy, caplog):
    with caplog.at_level(logging.INFO, logger="kernels"):
        for _ in range(3):
            toy(X64)
        toy(X64, backend="slow")
        toy(X64, backend="slow")
    lines = [r.getMessage() for r in caplog.records if r.name == "kernels"]
    assert lines == ["toy: using backend 'fast'", "toy: using backend 'slow' (pinned)"]


def test_probe_runs_once_and_a_crashing_probe_means_unavailable(toy):
    calls = []

    def probe():
        calls.append(1)
        raise ImportError("broken install")

    toy.register("flaky", priority=30, probe=probe)(lambda x: "flaky")
    assert toy(X64) == "fast" and toy(X64) == "fast"
    assert len(calls) == 1
    assert toy.reasons(X64)["flaky"] == "probe failed: ImportError: broken install"


# ---------------------------------------------------------------- a user's own attention backend
@pytest.fixture
def restore_attention():
    saved, ranked = dict(attention.backends), list(attention._ranked)
    yield
    attention.backends.clear()
    attention.backends.update(saved)
    attention._ranked = ranked


def test_user_registers_an_attention_backend_with_one_decorator(restore_attention):
    calls = []

    @attention.register("mine", priority=100,
                        supports=lambda q, k, v, **kw: None if q.shape[-1] <= 64 else "head dim > 64")
    def my_attention(q, k, v, **kw):
        calls.append(q.shape)
        return kernels.get_op("attention").backends["reference"].fn(q, k, v, **kw)

    q = torch.randn(1, 4, 2, 8)
    assert attention.select(q, q, q).name == "mine"
    attention(q, q, q)
    assert calls == [q.shape]
    big = torch.randn(1, 4, 2, 128)
    assert attention.select(big, big, big).name != "mine"  # declined: the next in priority runs


# ---------------------------------------------------------------- the attention op's built-in backends
def test_attention_backends_ranked():
    names = list(attention.reasons(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)))
    assert names[-1] == "reference"
    assert names.index("sdpa") < names.index("triton")  # our own kernels rank below torch's until measured
    assert attention.backends["sdpa"].priority > attention.backends["reference"].priority


def test_sdpa_declines_mixed_dtypes():
    q = torch.randn(1, 3, 2, 8)
    assert "share a dtype" in attention.backends["sdpa"].reason(q, q.double(), q)
    assert attention.select(q, q.double(), q).name == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_xformers_unavailable_without_cuda():
    q = torch.randn(1, 3, 2, 8)
    expected = "needs CUDA" if kernels.dispatch.module_probe("xformers")() is None else "xformers not installed"
    assert attention.reasons(q, q, q)["xformers"] == expected
    assert attention.select(q, q, q).name != "xformers"
    with pytest.raises(BackendError) as err:
        attention(q, q, q, backend="xformers")
    msg = str(err.value)
    assert f"pinned backend 'xformers' cannot run ({expected})" in msg
    for name, backend in attention.backends.items():
        assert f"- {name} (priority {backend.priority}): {backend.reason(q, q, q) or 'ok'}" in msg


# ---------------------------------------------------------------- xformers backend logic, on CPU
def memory_efficient_attention_equivalent(query, key, value, attn_bias=None, scale=None):
    """xformers' documented PyTorch equivalent of memory_efficient_attention, with its 5-D GQA layout
    ([B, M, G, H, K], k/v expanded with stride 0) and its attention biases materialized."""
    grouped = query.ndim == 5
    if grouped:
        assert key.stride(3) == 0 and value.stride(3) == 0, "xformers GQA expects expanded k/v"
        G = query.shape[2]
        query, key, value = (t.flatten(2, 3) for t in (query, key, value))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    attn = (q * scale) @ k.transpose(-2, -1)
    if attn_bias is not None:
        attn = attn + attn_bias.materialize(attn.shape, dtype=attn.dtype, device=attn.device)
    out = (attn.softmax(-1) @ v).transpose(1, 2)
    return out.unflatten(2, (G, -1)) if grouped else out


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_xformers_mapping(name, grad, monkeypatch):
    """The xformers backend's layout and biases, run through xformers' documented equivalent: equal
    to the reference (GPU kernels are checked by the conformance suite where CUDA is present)."""
    fmha = pytest.importorskip("xformers.ops.fmha")
    monkeypatch.setattr(pytest.importorskip("xformers.ops"), "memory_efficient_attention",
                        memory_efficient_attention_equivalent)
    assert fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask  # the bias types the backend uses exist
    assert_attention_equals_reference("xformers", grad, ATTENTION_CASES[name])


def test_varlen_blocks_reject_non_contiguous_segments():
    from kernels.packing import segment_blocks

    with pytest.raises(ValueError, match="row 0: segments must be contiguous"):
        segment_blocks(torch.tensor([[0, 0, 1, 0]]), 4)
