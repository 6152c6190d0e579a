"""Measure how far each backend is from `reference` on the conformance cases, to set tests/tolerances.py.

    python -m tests.measure_errors linear_attention delta_rule       # ops to measure (default: all)

Prints, per op, backend and dtype, the largest error over every case of tests/cases.py, forward and
gradients apart, measured as tests/test_conformance.py compares them: |got - want| / max(1, max |want|).
Tolerances are set at about 10x these numbers.
"""

from __future__ import annotations

import sys

import torch

import kernels
from tests.cases import CASES
from tests.test_conformance import DTYPES, _float_inputs, _outputs


def _scaled_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().clamp_min(1.0)
    return float(((got.double() - want.double()).abs() / scale).max())


def measure(op_name: str, backend: str, dtype: torch.dtype) -> tuple[float, float]:
    """(largest forward error, largest gradient error) over the op's cases."""
    op, forward, backward = kernels.get_op(op_name), 0.0, 0.0
    for case in CASES[op_name]:
        runs, cotangents = [], None
        for name in ("reference", backend):
            args, kwargs = case.make(dtype, "cpu")
            if op.backends[name].reason(*args, **kwargs) is not None:
                break
            inputs = _float_inputs(args, kwargs)
            for t in inputs:
                t.requires_grad_(True)
            out = _outputs(op(*args, backend=name, **kwargs))
            if cotangents is None:  # drawn once, from the reference's outputs, as the conformance test does
                torch.manual_seed(123)
                cotangents = [torch.randn_like(o, dtype=torch.float64).to(o.dtype) for o in out]
            grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cotangents)), inputs, allow_unused=True)
            runs.append(([o.detach() for o in out], grads))
        if len(runs) < 2:
            continue
        (ref_out, ref_grads), (out, grads) = runs
        forward = max([forward] + [_scaled_error(o, r) for o, r in zip(out, ref_out)])
        backward = max([backward] + [_scaled_error(g, r) for g, r in zip(grads, ref_grads) if r is not None])
    return forward, backward


def main(ops: list[str]) -> None:
    for op_name in ops or list(CASES):
        for backend in kernels.get_op(op_name).backends:
            if backend == "reference" or kernels.get_op(op_name).backends[backend].unavailable_reason():
                continue
            for dtype in DTYPES:
                forward, backward = measure(op_name, backend, dtype)
                print(f"{op_name:<18} {backend:<10} {str(dtype)[6:]:<9} forward {forward:.1e}  gradients {backward:.1e}")


if __name__ == "__main__":
    main(sys.argv[1:])
