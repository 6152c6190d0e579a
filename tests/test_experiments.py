"""Every experiment .gin file under configs/experiments runs for a few steps at tiny size (sweep
files as a one-seed sweep), and the paper comparison's models are parameter-matched. Each run
takes about a second on a quiet 2-core machine; none is marked slow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gin
import pytest

from tests.test_train import ROOT, one_thread  # noqa: F401  (autouse fixture)
from zoo import gin_config
from zoo.train import configurables
from zoo.train.loop import train
from zoo.train.run_dir import read_final

EXPERIMENTS = sorted((ROOT / "configs" / "experiments").rglob("*.gin"))
SWEEPS = [p for p in EXPERIMENTS if "SweepSpec." in p.read_text()]
RUNS = [p for p in EXPERIMENTS if p not in SWEEPS]

TINY = [
    "DIM = 16", "Sessa.num_heads = 2", "Attention.num_heads = 2", "Mamba2.head_dim = 16", "Mamba2.state_dim = 8",
    "SymbolSoup.min_tokens = 30", "SymbolSoup.max_tokens = 50",
    "DiffuseMQAR.num_pairs = 2", "DiffuseMQAR.num_queries = 2", "DiffuseMQAR.lag_range = (3, 18)",
    "MQAR.seq_len = 16", "MQAR.num_pairs = 2", "TextLM.seq_len = 32",
    "TrainConfig.steps = 2", "TrainConfig.batch_size = 4", "TrainConfig.grad_accum = 1", "TrainConfig.eval_every = 1",
    "TrainConfig.eval_examples = 4", "TrainConfig.final_eval_examples = 4", "TrainConfig.checkpoint_every = 1",
    "TrainConfig.precision = 'fp32'", "TrainConfig.device = 'cpu'",
]


def name(path: Path) -> str:
    return str(path.relative_to(ROOT / "configs"))


def params(path: Path) -> list[str]:
    """TINY plus the fewest layers (>= 2) that tile the file's LAYOUT."""
    gin_config.parse([name(path)], finalize=False)
    layout = gin.query_parameter("LAYOUT/macro.value")
    return [*TINY, f"NUM_LAYERS = {len(layout) * -(-2 // len(layout))}"]


def test_there_are_experiments():
    assert {"demo.gin", "paper_comparison/symbol_soup_sweep.gin", "paper_comparison/diffuse_mqar_sweep.gin"} <= \
        {name(p).removeprefix("experiments/") for p in EXPERIMENTS}


@pytest.mark.parametrize("path", RUNS, ids=name)
def test_experiment_runs_tiny(path, tmp_path):
    gin_config.parse([name(path)], params(path))
    result = train(configurables.configured_train_config(), gin_config.build_model, configurables.configured_task(),
                   tmp_path, operative_config=gin_config.operative_config)
    assert len(result["train_losses"]) == 2 and read_final(tmp_path)["step"] == 2


def _tool(tool: str):
    spec = importlib.util.spec_from_file_location(f"{tool}_tool", ROOT / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", SWEEPS, ids=name)
def test_sweep_runs_tiny(path, tmp_path, capsys):
    args = ["--sweep", name(path), "--seeds", "0", "--out", str(tmp_path)]
    for p in [*TINY, "NUM_LAYERS = 2"]:
        args += ["--gin_param", p]
    table = _tool("sweep").main(args)
    assert table.count("\n") == 2 + 3 - 1  # header, rule, one row per variant
    assert {"sweep.md", "results.json", "comparison.png"} <= {p.name for p in tmp_path.iterdir()}


def test_sweep_tool_table_and_resume(tmp_path):
    """A two-variant ad hoc sweep; running it again skips the finished runs."""
    args = ["--base", "train/tasks/symbol_soup.gin", "--variant", "sessa=mixers/sessa.gin",
            "--variant", "attention=mixers/attention.gin", "--seeds", "0", "1", "--out", str(tmp_path)]
    for p in [*TINY, "NUM_LAYERS = 1", "TrainConfig.steps = 1", "TrainConfig.eval_every = 0",
              "TrainConfig.checkpoint_every = 0", "TrainConfig.final_splits = ('test',)"]:
        args += ["--gin_param", p]
    sweep = _tool("sweep")
    table = sweep.main(args)
    lines = table.splitlines()
    assert lines[0].startswith("| variant | seeds | parameters | tokens per s | test loss | test accuracy")
    assert lines[2].startswith("| sessa | 2 |") and lines[3].startswith("| attention | 2 |") and " ± " in lines[2]
    assert (tmp_path / "comparison.png").stat().st_size > 0
    mtime = (tmp_path / "sessa" / "seed0" / "final_metrics.json").stat().st_mtime
    assert sweep.main(args) == table
    assert (tmp_path / "sessa" / "seed0" / "final_metrics.json").stat().st_mtime == mtime


@pytest.mark.parametrize("size", ["cpu", "large"])
@pytest.mark.parametrize("task", ["symbol_soup", "diffuse_mqar"])
def test_paper_comparison_is_parameter_matched(task, size):
    counts = {}
    for mixer in ("sessa", "attention", "mamba2"):
        gin_config.parse([f"experiments/paper_comparison/{task}_{mixer}.gin", f"train/paper_comparison/{size}.gin"])
        model = gin_config.build_model()
        counts[mixer] = sum(p.numel() for p in model.parameters())
        assert set(model.stack.pattern) == {"S" if mixer == "sessa" else "A" if mixer == "attention" else "M"}
    assert max(counts.values()) <= 1.05 * min(counts.values()), counts
