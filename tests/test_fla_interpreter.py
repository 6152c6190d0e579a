"""The `fla` backends against `reference` through the real flash-linear-attention kernels, on CPU.

Runs tests/fla_interpreter.py in its own process (it adapts Triton and FLA for Triton's interpreter
process-wide): every mapping path of both backends (g per key channel, per head, none; initial and
final states; packed rows with initial states; scale; float32 and float16), forward and every
gradient. Skipped, with the reason, where flash-linear-attention or triton is not installed. The
tolerances are about 10x the errors measured with flash-linear-attention 0.6.0 (float32 up to
1.3e-6, float16 up to 9.4e-4, relative to the largest reference value).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MISSING = [name for name in ("fla", "triton") if importlib.util.find_spec(name) is None]
TOLERANCE = {"float32": 1e-5, "float16": 1e-2}


@pytest.mark.skipif(bool(MISSING), reason=f"needs {' and '.join(MISSING)} (pip install '.[fla,triton]')")
def test_fla_backends_match_reference_through_real_fla():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "tests.fla_interpreter"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8, run.stdout
    bad = [r for r in rows if not max(r["forward"], r["grads"]) <= TOLERANCE[r["dtype"]]]
    assert not bad, bad
