"""`torchrun --nproc_per_node 2 tools/train.py` on CPU (gloo) matches one process with the same
global batch: losses within 1e-5 over several steps, with DDP and with FSDP2 fully_shard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train import ROOT, run, tiny, train_losses
from zoo.train import checkpoint
from zoo.train.run_dir import read_final

PARAMS = ["TrainConfig.steps = 4", "TrainConfig.batch_size = 8", "TrainConfig.grad_accum = 2", "adamw.lr = 1e-2",
          "TrainConfig.eval_every = 2", "TrainConfig.checkpoint_every = 2", "TrainConfig.device = 'cpu'"]


def torchrun(run_dir: Path, *params: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tools" / "train.py"), "--gin_file", "train/tasks/symbol_soup.gin", "--run_dir", str(run_dir)]
    for p in tiny("symbol_soup", *PARAMS, *params):
        cmd += ["--gin_param", p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(folder, "symbol_soup", *PARAMS)
    finally:
        torch.set_num_threads(threads)
    return folder


def _check_matches(single: Path, multi: Path) -> None:
    one, two = train_losses(single), train_losses(multi)
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, abs=1e-5)
    # (weights are not compared: Adam turns float-rounding noise in near-zero gradients into full steps)
    a = checkpoint.load_weights(checkpoint.latest(single / "checkpoints") / checkpoint.WEIGHTS)
    b = checkpoint.load_weights(checkpoint.latest(multi / "checkpoints") / checkpoint.WEIGHTS)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}  # full, unsharded tensors
    assert read_final(multi)["validation"]["loss"] == pytest.approx(read_final(single)["validation"]["loss"], abs=1e-3)
    # only rank 0 wrote: one set of files, no second metrics stream
    assert sorted(p.name for p in multi.iterdir()) == ["checkpoints", "config.gin", "final_metrics.json",
                                                      "metrics.jsonl", "plots"]
    # the 2-process checkpoint (weights and name-keyed optimizer state) continues in one process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        more = run(multi, "symbol_soup", *PARAMS, "TrainConfig.steps = 5", resume=True)
    finally:
        torch.set_num_threads(threads)
    assert len(more["train_losses"]) == 1 and train_losses(multi)[:4] == two


def test_ddp_two_processes_match_one(single, tmp_path):
    out = torchrun(tmp_path)
    _check_matches(single, tmp_path)
    assert out.stdout.count("| validation |") == 1  # progress and results from rank 0 only


def test_fsdp_two_processes_match_one(single, tmp_path):
    torchrun(tmp_path, "TrainConfig.strategy = 'fsdp'")
    _check_matches(single, tmp_path)
