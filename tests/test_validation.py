"""Trust per device (kernels.validation): a backend registered with needs_validation=True is not picked
automatically on a device until validate() has passed it there; pinning runs it with a warning; the
verdict is stored in the cache file (here a temporary one) and survives a reload.

A throwaway op `trusty` stands in for a real one (its cases run in milliseconds on CPU):
    mine       priority 10, needs validation, correct
    sloppy     priority 20, needs validation, wrong by 10 %
    reference  priority 0
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import kernels
from kernels import dispatch, validation
from kernels.dispatch import OPS, Op, UnvalidatedBackendWarning
from tools import info, validate as validate_cli


@pytest.fixture
def trusty(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    saved = set(dispatch.VALIDATED)
    op = Op("trusty")
    op.register("reference")(lambda x, w: (x @ w).tanh())
    op.register("mine", priority=10, needs_validation=True)(lambda x, w: torch.tanh(torch.einsum("td,de->te", x, w)))
    op.register("sloppy", priority=20, needs_validation=True)(lambda x, w: 1.1 * (x @ w).tanh())
    validation.register_cases("trusty", [validation.Case("T5", lambda dtype, device: (
        (torch.randn(5, 3, dtype=dtype, device=device), torch.randn(3, 4, dtype=dtype, device=device)), {}))])
    validation.load()
    yield op
    del OPS["trusty"], validation.CASES["trusty"]
    dispatch.VALIDATED.clear()
    dispatch.VALIDATED.update(saved)
    dispatch._warned.difference_update({w for w in dispatch._warned if w[0] == "trusty"})


X, W = torch.randn(5, 3), torch.randn(3, 4)


def test_unvalidated_backends_wait_and_pinning_warns(trusty):
    assert trusty.select(X, W).name == "reference"
    assert "not validated on cpu" in trusty.backends["mine"].auto_reason(X, W)
    with pytest.warns(UnvalidatedBackendWarning, match="pinned backend 'mine' is not validated on cpu"):
        torch.testing.assert_close(trusty(X, W, backend="mine"), (X @ W).tanh())


def test_validate_trusts_what_passes_and_stores_it(trusty):
    report = kernels.validate(ops=["trusty"])
    assert report.verdicts == {"trusty/mine": True, "trusty/sloppy": False}
    assert not report.ok and "FAIL" in str(report)
    assert trusty.select(X, W).name == "mine"  # sloppy (higher priority) failed: still skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnvalidatedBackendWarning)
        trusty(X, W, backend="mine")  # validated: no warning
    stored = json.loads(validation.cache_file().read_text())["results"][dispatch.device_key(torch.device("cpu"))]
    assert stored["trusty/mine"]["passed"] and not stored["trusty/sloppy"]["passed"]
    assert stored["trusty/sloppy"]["failures"]
    dispatch.VALIDATED.clear()
    validation.load()  # as a new process would
    assert trusty.select(X, W).name == "mine"
    validation.forget("cpu")
    assert trusty.select(X, W).name == "reference"


def test_a_crashing_backend_is_a_failed_row(trusty):
    def broken(x, w):
        raise RuntimeError("out of resources: shared memory")

    trusty.register("broken", priority=30, needs_validation=True)(broken)
    report = kernels.validate(ops=["trusty"], backends=["broken"])
    assert report.verdicts == {"trusty/broken": False}
    assert "error: RuntimeError: out of resources" in str(report)


def test_validate_cli_and_info_show_the_state(trusty, capsys):
    validate_cli.main(["--ops", "trusty", "--backends", "mine"])  # raises SystemExit(1) on a failure
    assert "trusty/mine: validated" in capsys.readouterr().out
    validate_cli.main(["--show"])
    assert "trusty/mine" in capsys.readouterr().out
    text = info.backends_text(torch.device("cpu"))
    assert "[validated here" in text.split("  trusty")[1]
    triton_rows = [line for line in text.splitlines() if line.strip().startswith("triton ")]
    assert triton_rows and all("[not validated here]" in line for line in triton_rows)
