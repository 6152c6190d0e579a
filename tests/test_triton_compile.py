"""Compiling the Triton kernels for sm_90 on this CPU (kernels.triton_target; no GPU needed).

Run in fresh processes without TRITON_INTERPRET, so the kernels are real JIT functions: lengths
never cause recompilation; the forward and backward of all three ops at four sequence lengths
compile exactly what one length compiles (counted, not compiled: fast).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kernels.triton_utils import triton

pytestmark = pytest.mark.skipif(triton is None, reason="needs triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COUNT = """
import json, sys, torch
import kernels
from kernels.triton_target import virtual_gpu
fns = {name: kernels.get_op(name).backends["triton"].fn for name in ("attention", "feedback_solve", "ssd")}
with virtual_gpu(compile=False) as seen:
    for T in LENGTHS:
        q = torch.randn(1, T, 4, 64, dtype=torch.bfloat16, requires_grad=True)
        fns["attention"](q, q[:, :, :2], q[:, :, :2], window=50).sum().backward()
        f = torch.randn(1, T, 64, dtype=torch.bfloat16, requires_grad=True)
        fns["feedback_solve"](f, f, f, torch.rand(1, T)).sum().backward()
        x = torch.randn(1, T, 2, 64, dtype=torch.bfloat16, requires_grad=True)
        B = torch.randn(1, T, 1, 64, dtype=torch.bfloat16, requires_grad=True)
        fns["ssd"](x, torch.rand(1, T, 2), -torch.rand(2), B, B).float().sum().backward()
print(json.dumps({k: len(v) for k, v in seen.by_kernel().items()}))
"""


def _run(code: str, timeout: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_lengths_do_not_cause_recompilation():
    """Each run starts from cold caches (a fresh process), as a GPU run would."""
    one = json.loads(_run("LENGTHS = [100]" + COUNT, timeout=600))
    four = json.loads(_run("LENGTHS = [100, 128, 257, 1000]" + COUNT, timeout=600))
    assert set(one) == set(four) and len(one) == 13, (one, four)
    assert four == one, f"more lengths compiled more variants: {one} -> {four}"
    assert one["inverse_kernel"] == 1
