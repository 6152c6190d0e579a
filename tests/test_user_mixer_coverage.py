"""A user's mixer registered before the tests are collected is covered by the registry-driven
invariant tests without editing them, and a declared exemption is reported with its reason.

The mixer lives in a module loaded as a pytest plugin (`pytest -p user_mixers`), as a user would
load their own mixers (or import them from a conftest.py); pytest runs in a subprocess so that
this session's registry stays untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

USER_MIXERS = '''
import torch
from torch import nn

from blocks.mixer import Mixer
from zoo.registry import register_mixer


@register_mixer("user_ema")
class UserEMA(Mixer):
    """h_t = lam h_{t-1} + W_in x_t, reset where a segment starts;  y_t = W_out h_t."""

    invariant_exemptions = {"decode": "this example keeps no decoding state"}

    def __init__(self, dim, lam=0.9, backends=None):
        super().__init__()
        self.dim, self.lam, self.ops = dim, lam, {}
        self.w_in, self.w_out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, *, seq_idx=None, state=None):
        u = self.w_in(x)
        h, out = torch.zeros_like(u[:, 0]), []
        for t in range(x.shape[1]):
            if seq_idx is not None and t > 0:
                h = torch.where((seq_idx[:, t] != seq_idx[:, t - 1])[:, None], 0.0, h)
            h = self.lam * h + u[:, t]
            out.append(h)
        return self.w_out(torch.stack(out, dim=1))
'''


def test_a_registered_user_mixer_is_covered(tmp_path):
    (tmp_path / "user_mixers.py").write_text(USER_MIXERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "TRITON_INTERPRET": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    modules = ["tests/test_blocks.py", "tests/test_packing.py", "tests/test_cache.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "user_mixers", "-p", "no:cacheprovider", "-q", "-rs",
                             "-k", "user_ema", *modules], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # causality (2 blocks), gradients (2 blocks x 2 dtypes), declared exemptions, packing (mixer and stack, 3 layouts each)
    assert "13 passed" in out, out
    assert "user_ema declares it does not meet 'decode': this example keeps no decoding state" in out, out
    assert "user_ema calls no op" in out, out
