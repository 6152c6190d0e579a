"""tools/gpu_check.py's dry run: the whole code path on CPU (tiny shapes, Triton in its interpreter),
one JSON and one markdown table, every backend either checked or skipped with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", ZOO_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(tmp_path / "check")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.splitlines()[0].startswith("device: CPU")  # versions first
    report = json.loads((tmp_path / "check.json").read_text())
    assert set(report["versions"]) == {"device", "torch", "CUDA", "triton", "xformers", "flash-attn", "mamba-ssm",
                                        "flash-linear-attention"}
    rows = report["rows"]
    import kernels

    for op in kernels.OPS:
        for backend in kernels.get_op(op).backends:
            if backend == "reference":
                continue
            mine = [r for r in rows if r["op"] == op and r["backend"] == backend]
            assert {r["part"] for r in mine} == {"correctness", "speed"}, (op, backend)
            assert all(r["result"].startswith(("ok", "skipped: ")) for r in mine), mine
    ran = [r for r in rows if r["part"] == "correctness" and r["result"] == "ok"]
    assert {(r["op"], r["backend"]) for r in ran} >= {("attention", "triton"), ("feedback_solve", "triton"), ("ssd", "triton"),
                                                      ("linear_attention", "chunked"), ("delta_rule", "chunked")}
    assert all(r["error"] < 5e-2 for r in ran)
    speed = {r["backend"]: r for r in rows if r["part"] == "speed" and r["op"] == "attention"}
    assert speed["sdpa[flash]"]["fwd_x"] == 1.0 and "SDPA picks" in speed["sdpa"]["result"]
    table = (tmp_path / "check.md").read_text()
    assert table.count("\n| speed |") == sum(r["part"] == "speed" for r in rows)


def test_a_kernel_error_is_a_failed_row(monkeypatch):
    """A backend that raises becomes a row with its error; the check goes on."""
    import torch

    import kernels
    from tools import gpu_check

    op = kernels.get_op("attention")

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory, required 262144")

    monkeypatch.setattr(op.backends["sdpa"], "fn", broken)
    rows = gpu_check.speed(torch.device("cpu"), repeats=1, dry_run=True)
    sdpa = [r for r in rows if r.backend in ("sdpa", "sdpa[flash]")]
    assert all(r.result.startswith("error: RuntimeError: out of resources") for r in sdpa)
    assert gpu_check.failed(rows) == sdpa
