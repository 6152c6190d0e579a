"""tools/reproduce.py: a tiny reproduction runs end to end through tools/sweep.py, and its report,
JSON and figure hold what the runs measured, next to chance, the best shortcut and the ceiling.
(The six models' parameter matching is tested in tests/test_experiments.py.)"""

from __future__ import annotations

import json
import runpy

import pytest

from zoo import gin_config
from zoo.train.reproduction import MODEL_NAMES, PAPER, model_entry, task_table
from zoo.train.run_dir import read_final
from zoo.train.sweep import mean_std

TOOLS = gin_config.CONFIGS_DIR.parent / "tools"
TINY = ["DIM = 16", "Sessa.num_heads = 2", "Attention.num_heads = 2", "Mamba2.head_dim = 16", "Mamba2.state_dim = 8",
        "NUM_LAYERS = 2", "DiffuseMQAR.num_pairs = 2", "DiffuseMQAR.num_queries = 2", "DiffuseMQAR.lag_range = (3, 18)",
        "TrainConfig.steps = 2", "TrainConfig.batch_size = 4", "TrainConfig.eval_every = 0",
        "TrainConfig.eval_examples = 4", "TrainConfig.final_eval_examples = 8"]


def cells(text: str, first: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_tiny_reproduction_writes_the_report(tmp_path):
    args = ["--tasks", "diffuse_mqar", "--seeds", "0", "1", "--only", "sessa", "mamba2", "--workers", "2",
            "--out", str(tmp_path)]
    for p in TINY:
        args += ["--gin_param", p]
    text = runpy.run_path(str(TOOLS / "reproduce.py"))["main"](args)
    entry = json.loads((tmp_path / "reproduction.json").read_text())
    data = entry["tasks"]["diffuse_mqar"]
    assert list(data["models"]) == ["sessa", "mamba2"] and entry["label"] == "2 steps"
    refs = data["references"]
    assert refs["num_examples"] == 8 and refs["chance"] == 1 / 64 and refs["ceiling"]["accuracy"]["value"] == 1.0
    for variant in ("sessa", "mamba2"):
        finals = [read_final(tmp_path / "diffuse_mqar" / variant / f"seed{s}") for s in (0, 1)]
        accs = [f["test"]["accuracy"] for f in finals]
        model = data["models"][variant]
        assert [model["seeds"][s]["accuracy"] for s in ("0", "1")] == accs
        assert model["mean"]["accuracy"] == pytest.approx(mean_std(accs)[0])
        assert model["parameters"] == finals[0]["parameters"]
        row = cells(text, MODEL_NAMES[variant])
        m = sum(accs) / 2
        assert row[2] == f"{accs[0]:.3f}, {accs[1]:.3f}" and row[3].startswith(f"{m:.3f} ± ")
        assert row[4] == f"{m / refs['ceiling']['accuracy']['value']:.2f}"  # fraction of the ceiling
        assert row[5] == f"{PAPER['diffuse_mqar'][variant]:.3f}"
    best = max(refs["baselines"].values(), key=lambda b: b["accuracy"]["value"])["accuracy"]
    shortcut = next(line for line in text.splitlines() if line.startswith("| *best shortcut"))
    assert f"{best['value']:.3f} ± {best['se']:.3f}" in shortcut
    assert cells(text, "*ceiling (exact recall)*")[3] == "1.000" and cells(text, "*chance*")[3] == f"{1 / 64:.3f}"
    lag_rows = text.split("per lag bucket")[1]
    for bucket, value in data["models"]["sessa"]["mean"].items():
        if bucket.startswith("accuracy_lag_"):
            assert bucket.removeprefix("accuracy_lag_").replace("_", "–") in lag_rows
    assert "Total wall time" in text and (tmp_path / "reproduction.png").stat().st_size > 0
    # --report_only rebuilds the same tables from the finished runs
    again = runpy.run_path(str(TOOLS / "reproduce.py"))["main"]([*args, "--report_only"])
    assert again.split("Total wall time")[0] == text.split("Total wall time")[0]


def test_model_entry_and_table_from_runs():
    runs = [{"seed": s, "final": {"test": {"loss": 1.0, "accuracy": a, "accuracy_lag_1_2": a / 2}, "parameters": 10,
                                  "tokens_per_s": 100.0, "train_time_s": 2.0, "wall_time_s": 60.0 * (s + 1)}}
            for s, a in ((0, 0.2), (1, 0.4))]
    m = model_entry("sessa_attention", runs)
    assert m["layout"] == "SA" and m["seeds"] == {"0": {"accuracy": 0.2, "accuracy_lag_1_2": 0.1},
                                                  "1": {"accuracy": 0.4, "accuracy_lag_1_2": 0.2}}
    assert m["mean"]["accuracy"] == pytest.approx(0.3) and m["std"]["accuracy"] == pytest.approx(0.1414, abs=1e-4)
    assert m["tokens_seen"] == 200.0 and m["wall_time_s"] == 90.0
    entry = {"tasks": {"symbol_soup": {"references": None, "models": {"sessa_attention": m}}}}
    assert cells(task_table(entry, "symbol_soup"), "Sessa / attention")[1:6] == ["SA", "0.200, 0.400", "0.300 ± 0.141",
                                                                                   "–", "–"]
