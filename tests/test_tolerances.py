"""Tolerances stay tied to measured errors (tests/tolerances.py, tests/measured_errors.json): none may
drift loose (over 30x its measurement) or tight (under 3x), every backend the conformance suite runs
here has a measurement, and the record still matches a fresh measurement."""

from __future__ import annotations

import json

import pytest
import torch

import kernels
from tests import measure_errors
from tests.cases import CASES
from tests.test_conformance import DTYPES
from tests.tolerances import CHECKS, CPU, tolerance

RECORD = json.loads(measure_errors.PATH.read_text())
DTYPE = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
REMEASURE = f"rerun `{measure_errors.COMMAND}` and set the tolerance to about 10x the new measurement"


def _within(tol: float, measured: float, dtype: torch.dtype, what: str) -> None:
    """3x <= tol / measured <= 30x; below one rounding step of the dtype, up to two steps are allowed
    (bfloat16 results that agree to float32 noise may still differ by one step on another CPU)."""
    assert tol >= 3 * measured, f"{what}: tolerance {tol:.0e} is under 3x the measured {measured:.1e}; {REMEASURE}"
    ceiling = max(30 * measured, 2 * torch.finfo(dtype).eps)
    assert tol <= ceiling, f"{what}: tolerance {tol:.0e} is over 30x the measured {measured:.1e}; {REMEASURE}"


@pytest.mark.parametrize("key", sorted(RECORD["errors"]))
def test_tolerance_is_3x_to_30x_the_measured_error(key):
    row = RECORD["errors"][key]
    if "not_measured" in row:
        assert row["not_measured"], key
        return
    device, op, backend, dtype = key.split("/")
    _within(tolerance(op, DTYPE[dtype], backend, device)["atol"], max(row["forward"], row["gradients"]), DTYPE[dtype], key)


@pytest.mark.parametrize("key", sorted(RECORD["checks"]))
def test_check_tolerance_is_3x_to_30x_the_measured_error(key):
    _, name, dtype = key.split("/")
    _within(CHECKS[name][DTYPE[dtype]], RECORD["checks"][key]["error"], DTYPE[dtype], key)


def test_every_tolerance_has_a_measurement():
    for op, backends in CPU.items():
        for backend, per_dtype in backends.items():
            for dtype in per_dtype:
                row = RECORD["errors"].get(measure_errors.key("cpu", op, backend, dtype), {})
                assert "forward" in row, f"cpu/{op}/{backend}/{dtype}: no measurement; {REMEASURE}"
    for name, per_dtype in CHECKS.items():
        for dtype in per_dtype:
            assert f"cpu/{name}/{str(dtype).removeprefix('torch.')}" in RECORD["checks"], (name, dtype, REMEASURE)


def test_every_backend_the_suite_runs_here_is_recorded():
    """A new op or backend (or one that became available here) needs its errors measured and a tolerance."""
    for op_name in CASES:
        op = kernels.get_op(op_name)
        for backend in op.backends:
            if backend == "reference" or op.backends[backend].unavailable_reason():
                continue
            for dtype in DTYPES["cpu"]:
                k = measure_errors.key("cpu", op_name, backend, dtype)
                assert k in RECORD["errors"], f"{k}: not in {measure_errors.PATH.name}; {REMEASURE}"
                if not torch.cuda.is_available():  # with CUDA, CUDA-only backends run here but decline CPU tensors
                    row = RECORD["errors"][k]
                    assert "not_measured" not in row or "declines" in row["not_measured"], \
                        f"{k}: recorded as not measured but runs here; {REMEASURE}"


def test_record_matches_a_fresh_measurement():
    """The record is what the command measures now (one op, backend and dtype; float32 noise can differ
    between CPUs, so within a factor 2)."""
    fresh = measure_errors.measure("ssd", "chunked", torch.float32, "cpu")
    row = RECORD["errors"]["cpu/ssd/chunked/float32"]
    for part in ("forward", "gradients"):
        assert row[part] / 2 <= fresh[part] <= 2 * row[part], (part, fresh[part], row[part], REMEASURE)
