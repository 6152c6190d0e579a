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

import inspect

import pytest
import torch

import kernels
from kernels.triton_utils import single_config
from tests.cases import CASES, NAN_READ_OUT, expected_nan, named_inputs, poisoned, poisonings
from tests.conftest import NEEDS_CUDA
from tests.tolerances import CPU, tolerance

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
    """The backends themselves, without the NaN policy's guard (test_backend_follows_the_nan_policy
    tests that; its copies would hide the strided views from the backends)."""
    with single_config(), kernels.nan_policy.enabled(False):
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


# ---------------------------------------------------------------- NaN policy (kernels.nan_policy)
NAN_DTYPES = {"cpu": torch.float32, "cuda": torch.float32}


def _nan_params():
    for device, dtype in NAN_DTYPES.items():
        for op_name, cases in CASES.items():
            for backend in kernels.get_op(op_name).backends:
                for case in cases:
                    if case_runs(device, backend, case, dtype):
                        yield pytest.param(op_name, backend, case, device, marks=CUDA if device == "cuda" else (),
                                           id=f"{device}-{op_name}-{backend}-{case.id}")


@pytest.mark.parametrize("op_name,backend,case,device", list(_nan_params()))
def test_backend_follows_the_nan_policy(op_name, backend, case, device, nan_poison):
    """Every backend, the reference included, on every case with one input element made NaN or +-inf
    (each float input in turn, tests/cases.py `poisonings`; in Triton's CPU interpreter only the
    first memory input): exactly the output positions the op's
    contract says the element reaches are NaN (every element of them), by brute force over positions
    (cases.expected_nan); the final state too, where the op returns one; every other output equals
    the output for the clean inputs; and the gradients are those of the clean run's loss over the
    outputs that stay finite (NaN outputs pass no gradient back), finite everywhere."""
    assert op_name in NAN_READ_OUT, f"state {op_name}'s NaN policy in tests/cases.py NAN_READ_OUT"
    dtype = NAN_DTYPES[device]
    op = kernels.get_op(op_name)
    names = [n for n, p in inspect.signature(op.backends["reference"].fn).parameters.items()
             if p.kind == p.POSITIONAL_OR_KEYWORD]
    args, kwargs = case.make(dtype, device)
    if op.backends[backend].reason(*args, **kwargs) is not None:
        pytest.skip(f"{backend}: {op.backends[backend].reason(*args, **kwargs)}")
    clean = named_inputs(names, args, kwargs)
    if "return_final_state" in inspect.signature(op.backends["reference"].fn).parameters:
        clean["return_final_state"] = True
    tol = _self_tolerance(op_name, backend, dtype, device)
    poisons = poisonings(clean)
    if device == "cpu" and "triton" in backend:  # the interpreter is slow: one memory input per case
        poisons = [p for p in poisons if p.name not in NAN_READ_OUT[op_name]][:1]
    with single_config():
        for p in poisons:
            _check_nan(op, backend, case, p, clean, tol)


def _self_tolerance(op_name, backend, dtype, device):
    """A backend's poisoned run against its own clean run differs only by rounding: held to the
    backend's conformance tolerance (`reference`, which has none, to the loosest of its op's)."""
    if device != "cpu" or backend != "reference":
        return tolerance(op_name, dtype, backend, device)
    return dict(atol=max(t[dtype] for t in CPU[op_name].values() if dtype in t), rtol=0.0)


def _call(op, backend, inputs):
    floats = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items()
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    out = _outputs(op(**{**inputs, **floats}, backend=backend))
    return out, floats


def _check_nan(op, backend, case, p, clean, tol):
    where = f"{op.name} {backend} {case.id} {p.id}"
    got, got_inputs = _call(op, backend, poisoned(clean, p))
    want, want_inputs = _call(op, backend, clean)
    with kernels.nan_policy.enabled(False):  # on finite inputs the guard changes nothing
        for i, (w, raw) in enumerate(zip(want, _call(op, backend, clean)[0])):
            _close(f"{where}: output {i} with the policy off", w.detach(), raw.detach(), tol)
    reached = expected_nan(op.name, clean, p, got[0].shape[1]).to(got[0].device)
    keeps_state = p.name not in NAN_READ_OUT[op.name]
    masks = [reached] + [reached[:, -1] & keeps_state] * (len(got) - 1)  # (o, final state)
    for i, (g, w, m) in enumerate(zip(got, want, masks)):
        m = m.reshape(*m.shape, *[1] * (g.ndim - m.ndim)).expand_as(g)
        nan = torch.isnan(g)
        assert torch.equal(nan, m), (f"{where}: output {i} is NaN at positions {_positions(nan)}; the policy says "
                                     f"{_positions(m)}")
        if not m.all():
            _close(f"{where}: output {i} where finite", g[~m], w.detach()[~m], tol)

    torch.manual_seed(123)
    cotangents = [torch.randn_like(w) for w in want]
    grads = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, cotangents)), list(got_inputs.values()),
                                allow_unused=True)
    finite_loss = sum((torch.where(m.reshape(*m.shape, *[1] * (w.ndim - m.ndim)), 0.0, w) * c).sum()
                      for w, c, m in zip(want, cotangents, masks))
    want_grads = torch.autograd.grad(finite_loss, list(want_inputs.values()), allow_unused=True)
    for name, g, w in zip(got_inputs, grads, want_grads):
        if w is None:
            continue
        assert g is not None and torch.isfinite(g).all(), f"{where}: gradient of {name} is missing or not finite"
        _close(f"{where}: gradient of {name}", g, w, tol)


def _positions(mask: torch.Tensor) -> list:
    """(row, step) pairs where any element of a (B, T, ...) mask is set (or rows, for a final state)."""
    rows = mask.reshape(*mask.shape[:2], -1).any(-1) if mask.ndim > 2 else mask
    return rows.nonzero().tolist()
