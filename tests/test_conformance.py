"""Every backend of every op against the `reference` backend: forward and gradients, per dtype and
device, driven by tests/cases.py and the registry (new ops and backends are covered when they appear).

cpu: float64, float32, bfloat16; backends whose name contains "triton" run only the cases tagged
"tiny" (Triton's CPU interpreter is slow), and only where the interpreter is on.
cuda (marker `gpu`, `make test-gpu`): float32, bfloat16, float16 on every case, "gpu" cases too,
"large" ones in half precision only; Triton kernels run natively, one autotune config each
(kernels.triton_utils.single_config: one compilation per kernel variant). Collected everywhere,
skipped without CUDA with the reason. Unavailable backends and inputs a backend declines are skipped
with the backend's own reason.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.triton_utils import single_config
from tests.cases import CASES
from tests.conftest import NEEDS_CUDA
from tests.tolerances import tolerance

DTYPES = {"cpu": [torch.float64, torch.float32, torch.bfloat16],
          "cuda": [torch.float32, torch.bfloat16, torch.float16]}
CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)]


def case_runs(device, backend, case, dtype):
    if device == "cpu":
        return "gpu" not in case.tags and ("triton" not in backend or "tiny" in case.tags)
    return "large" not in case.tags or dtype != torch.float32


def _params():
    for device in DTYPES:
        for op_name, cases in CASES.items():
            for backend in kernels.get_op(op_name).backends:
                if backend == "reference":
                    continue
                for case in cases:
                    for dtype in DTYPES[device]:
                        if case_runs(device, backend, case, dtype):
                            yield pytest.param(op_name, backend, case, dtype, device, marks=CUDA if device == "cuda" else (),
                                               id=f"{device}-{op_name}-{backend}-{case.id}-{str(dtype)[6:]}")


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _float_inputs(args, kwargs):
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return [t for t in tensors if t.is_floating_point()]


def _close(name, got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    assert not torch.isnan(got).any(), f"{name}: NaN in output (unwritten elements?)"
    scale = scale_of(want)
    torch.testing.assert_close(got.double() / scale, want.double() / scale, msg=lambda m: f"{name}: {m}", **tol)


def scale_of(want: torch.Tensor) -> float:
    """What errors are measured relative to: max(1, max |reference|) (the feedback solve amplifies by
    up to 1 / (1 - gamma_max), so absolute errors grow with the output's size)."""
    return want.abs().max().clamp_min(1.0).item()


@pytest.mark.parametrize("op_name,backend,case,dtype,device", list(_params()))
def test_backend_matches_reference(op_name, backend, case, dtype, device, nan_poison):
    with single_config():
        pairs = compare(op_name, backend, case, dtype, device)
    if isinstance(pairs, str):
        pytest.skip(pairs)
    tol = tolerance(op_name, dtype, backend, device)
    for name, got, want in pairs:
        assert got is not None, f"{name}: backend returned none"
        _close(name, got, want, tol)


def compare(op_name, backend, case, dtype, device):
    """[(name, backend's tensor, reference's tensor)] for every output, then every float input's gradient
    of the same random projection of the outputs; or the reason the backend declines the case."""
    op = kernels.get_op(op_name)
    args, kwargs = case.make(dtype, device)
    for t in _float_inputs(args, kwargs):
        t.requires_grad_(True)
    why = op.backends[backend].reason(*args, **kwargs)
    if why is not None:
        return f"{backend}: {why}"
    ref_args = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    ref_kwargs = {k: v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}

    got = _outputs(op(*args, backend=backend, **kwargs))
    want = _outputs(op(*ref_args, backend="reference", **ref_kwargs))
    pairs = [(f"output {i}", g.detach(), w.detach()) for i, (g, w) in enumerate(zip(got, want))]

    torch.manual_seed(123)
    cotangents = [torch.randn_like(w, dtype=torch.float64).to(w.dtype) for w in want]
    loss = sum((g * c).sum() for g, c in zip(got, cotangents))
    ref_loss = sum((w * c).sum() for w, c in zip(want, cotangents))
    inputs, ref_inputs = _float_inputs(args, kwargs), _float_inputs(ref_args, ref_kwargs)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs, allow_unused=True)
    return pairs + [(f"grad of input {i}", g, w) for i, (g, w) in enumerate(zip(grads, ref_grads)) if w is not None]


@pytest.mark.parametrize("op_name", list(CASES))
def test_reference_gradcheck(op_name):
    """float64 gradcheck of every reference backend on its tiny cases."""
    op = kernels.get_op(op_name)
    for case in CASES[op_name]:
        if "tiny" not in case.tags:
            continue
        args, kwargs = case.make(torch.float64, "cpu")
        floats = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        kfloats = [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]

        def fn(*xs):
            a = list(args)
            for (i, _), x in zip(floats, xs[:len(floats)]):
                a[i] = x
            kw = dict(kwargs)
            for (k, _), x in zip(kfloats, xs[len(floats):]):
                kw[k] = x
            return op(*a, backend="reference", **kw)

        xs = [a.detach().requires_grad_(True) for _, a in floats] + [v.detach().requires_grad_(True) for _, v in kfloats]
        assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-6), f"{op_name} {case.id}"
