"""tools/reproduce.py and its sweeps (configs/reproduction/): the six models are parameter-matched,
and a tiny reproduction runs end to end through tools/sweep.py and writes its report."""

from __future__ import annotations

import runpy

import pytest

from zoo import gin_config
from zoo.train.configurables import read_sweep

TOOLS = gin_config.CONFIGS_DIR.parent / "tools"
TASKS = ["symbol_soup", "diffuse_mqar"]


@pytest.mark.parametrize("task", TASKS)
def test_the_six_models_are_parameter_matched(task):
    spec = read_sweep(f"reproduction/{task}.gin")
    assert list(spec.variants) == ["sessa", "attention", "mamba2", "sessa_attention", "sessa_mamba2", "sessa_nofb"]
    counts, patterns = {}, {}
    for variant, files in spec.variants.items():
        gin_config.parse([*spec.gin_files, *files], spec.gin_params)
        model = gin_config.build_model()
        counts[variant] = sum(p.numel() for p in model.parameters())
        patterns[variant] = model.stack.pattern
    assert patterns == {"sessa": "SSSS", "attention": "AAAA", "mamba2": "MMMM", "sessa_attention": "SASA",
                        "sessa_mamba2": "SMSM", "sessa_nofb": "NNNN"}
    assert all(abs(n / counts["sessa"] - 1) <= 0.05 for n in counts.values()), counts  # within 5% of Sessa


def test_tiny_reproduction_writes_the_report(tmp_path):
    tiny = ["DIM = 16", "Sessa.num_heads = 2", "Attention.num_heads = 2", "Mamba2.head_dim = 16",
            "Mamba2.state_dim = 8", "NUM_LAYERS = 2", "DiffuseMQAR.num_pairs = 2", "DiffuseMQAR.num_queries = 2",
            "DiffuseMQAR.lag_range = (3, 18)", "TrainConfig.steps = 2", "TrainConfig.batch_size = 4",
            "TrainConfig.eval_every = 0", "TrainConfig.eval_examples = 4", "TrainConfig.final_eval_examples = 8"]
    args = ["--tasks", "diffuse_mqar", "--seeds", "0", "1", "--only", "sessa", "mamba2", "--workers", "2",
            "--out", str(tmp_path)]
    for p in tiny:
        args += ["--gin_param", p]
    text = runpy.run_path(str(TOOLS / "reproduce.py"))["main"](args)
    assert "| sessa | S | " in text and "| mamba2 | M | " in text and "0.154" in text  # ours and the paper's
    assert "(s0), " in text and "Total wall time" in text and "lag bucket" in text
    assert (tmp_path / "reproduction.png").stat().st_size > 0
    assert (tmp_path / "diffuse_mqar" / "sessa" / "seed1" / "final_metrics.json").exists()
