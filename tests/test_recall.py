"""The recall comparison (tools/recall.py, zoo.train.recall): decoding-state accounting from the
cache, the report's table and figure, the tool end to end at tiny size, and the published results
file (docs/results/recall.json) against what the code computes today."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.test_train import ROOT, one_thread  # noqa: F401  (autouse fixture)
from zoo import gin_config
from zoo.models import CausalLM
from zoo.stack import Stack
from zoo.tasks.reference import references
from zoo.train import configurables
from zoo.train.recall import check_entry, plot, state_kind, state_numbers, table

RESULTS = ROOT / "docs" / "results" / "recall.json"
TINY = ["DIM = 16", "Mamba2.head_dim = 16", "MQAR.seq_len = 16", "MQAR.num_pairs = 2", "NUM_LAYERS = 2",
        "TrainConfig.steps = 2", "TrainConfig.batch_size = 4", "TrainConfig.eval_every = 0",
        "TrainConfig.final_eval_examples = 8", "SlidingWindowAttention.window = 4"]


def _tool():
    spec = importlib.util.spec_from_file_location("recall_tool", ROOT / "tools" / "recall.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_state_numbers_follow_the_cache():
    D, T = 8, 10
    attention = state_numbers(CausalLM(16, D, stack=lambda d: Stack(d, "KA", num_layers=2)), T)
    conv = 3 * D  # kernel 4: the last 3 inputs
    assert attention["layers"] == [("short_conv", conv, None), ("attention", 2 * D * T, 2 * D)]
    assert attention["per_layer"] == conv + 2 * D * T  # one (convolution, mixer) pair
    assert state_kind(attention["layers"]) == "grows: 16 per token"
    hybrid = state_numbers(CausalLM(16, D, stack=lambda d: Stack(d, "KAKL", num_layers=4)), T)
    gla = hybrid["layers"][3][1]
    assert gla == 4 * (D // 2 // 4) * (D // 4)  # 4 heads of dk x dv = (expand_k D / H) x (D / H)
    assert hybrid["per_layer"] == (2 * conv + 2 * D * T + gla) / 2
    assert state_kind(hybrid["layers"]) == "grows: 16 per token (+ constant)"
    assert state_kind(state_numbers(CausalLM(16, D, stack=lambda d: Stack(d, "KL", num_layers=2)), T)["layers"]) == \
        "constant"


def _entry() -> dict:
    cell = lambda acc, state: {"parameters": 1000, "state_per_layer": state, "state_kind": "constant",  # noqa: E731
                               "seeds": {"0": acc, "1": acc + 0.1}, "mean": acc + 0.05, "std": 0.07, "wall_time_s": 1.0}
    return {"command": "python tools/recall.py", "wall_time_s": 10.0, "seq_len": 64, "task": "MQAR test",
            "references": None,
            "models": {"attention": {"name": "attention", "layout": "KA", "widths": {"32": cell(0.5, 4192),
                                                                                     "64": cell(0.8, 8384)}},
                       "gla": {"name": "gla", "layout": "KL", "widths": {"64": cell(0.2, 1216)}}}}


def test_table_and_plot(tmp_path):
    entry = _entry()
    check_entry(entry)
    lines = table(entry).splitlines()
    assert lines[0] == ("| model | layout | D = 32: accuracy | state / layer | parameters | D = 64: accuracy | "
                        "state / layer | parameters |")
    assert lines[2] == "| attention | KA | 0.550 ± 0.070 (0.500, 0.600) | 4.2k | 1,000 | 0.850 ± 0.070 (0.800, 0.900) | 8.4k | 1,000 |"
    assert lines[3].startswith("| gla | KL | – | – | – | 0.250 ± 0.070")
    assert plot(entry, tmp_path / "recall.png").stat().st_size > 0
    del entry["models"]["gla"]["layout"]
    with pytest.raises(ValueError, match="'gla' misses 'layout'"):
        check_entry(entry)


def test_variant_names_and_layouts():
    tool = _tool()
    assert tool.model_and_width("sessa_gated_deltanet-d64") == ("sessa_gated_deltanet", 64)
    with pytest.raises(ValueError, match="<model>-d<width>"):
        tool.model_and_width("gla")
    assert tool.compact("KAKA") == "KA" and tool.compact("KSKG") == "KSKG"


def test_tool_runs_two_variants_tiny(tmp_path):
    args = ["--only", "attention-d32", "gla-d32", "--seeds", "0", "--out", str(tmp_path)]
    for p in TINY:
        args += ["--gin_param", p]
    text = _tool().main(args)
    entry = json.loads((tmp_path / "recall.json").read_text())
    check_entry(entry)
    assert list(entry["models"]) == ["attention", "gla"] and entry["seq_len"] == 16
    assert entry["models"]["attention"]["layout"] == "KA"
    cell = entry["models"]["attention"]["widths"]["16"]  # DIM = 16 from the tiny parameters
    assert cell["state_per_layer"] == 3 * 16 + 2 * 16 * 16 and set(cell["seeds"]) == {"0"}
    assert "| attention | KA |" in text and (tmp_path / "recall.png").exists()
    assert (tmp_path / "attention-d32" / "seed0" / "config.gin").exists()  # the operative config next to the run


def test_published_results_match_the_sweep_and_its_references():
    entry = json.loads(RESULTS.read_text())
    check_entry(entry)
    spec = configurables.read_sweep("experiments/recall/mqar_sweep.gin")
    tool = _tool()
    expected = {}
    for variant in spec.variants:
        name, width = tool.model_and_width(variant)
        expected.setdefault(name, set()).add(str(width))
    assert {n: set(m["widths"]) for n, m in entry["models"].items()} == expected
    assert all(set(c["seeds"]) == {str(s) for s in spec.seeds} for m in entry["models"].values()
               for c in m["widths"].values())
    gin_config.parse([*spec.gin_files, *spec.variants["attention-d64"]])
    config, task = configurables.configured_train_config(), configurables.configured_task()
    assert entry["seq_len"] == task.seq_len
    fresh = references(task, "test", config.final_eval_examples)
    from tests.test_results_tables import assert_same
    assert_same(entry["references"], fresh)
