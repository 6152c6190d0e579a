"""Every experiment under configs/experiments runs for a few steps at tiny size: the top-level
files as single runs, every sweep file (configs/experiments/**/*_sweep.gin) as a one-seed sweep
of all its variants. The paper comparison's six models are parameter-matched in both settings.
Each run takes about a second on a quiet 2-core machine; none is marked slow."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import gin
import pytest

from tests.test_train import ROOT, one_thread  # noqa: F401  (autouse fixture)
from zoo import gin_config
from zoo.tasks.reference import References
from zoo.train import configurables
from zoo.train.loop import train
from zoo.train.run_dir import read_final

EXPERIMENTS = sorted((ROOT / "configs" / "experiments").rglob("*.gin"))
SWEEPS = [p for p in EXPERIMENTS if "SweepSpec." in p.read_text()]
# a folder of experiments is driven by its sweep files (its other files are the parts they combine)
RUNS = [p for p in EXPERIMENTS if p not in SWEEPS and p.parent == ROOT / "configs" / "experiments"]
PAPER = ["sessa", "attention", "mamba2", "sessa_attention", "sessa_mamba2", "sessa_nofb"]

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
    assert [name(p) for p in RUNS] == ["experiments/demo.gin"]


def test_every_paper_comparison_file_is_used():
    """One tree: each file of experiments/paper_comparison is a sweep, named by a sweep, included by
    a file named by a sweep, or the documented larger overlay."""
    folder = ROOT / "configs" / "experiments" / "paper_comparison"
    named = set()
    for sweep in SWEEPS:
        if sweep.parent == folder:
            spec = configurables.read_sweep(name(sweep))
            named |= {*spec.gin_files, *(f for files in spec.variants.values() for f in files)}
    used = set(named)
    for f in named:
        used |= set(re.findall(r"^include\s+'([^']+)'", (ROOT / "configs" / f).read_text(), flags=re.M))
    files = {name(p) for p in folder.glob("*.gin")} - {name(p) for p in SWEEPS}
    assert files - used == {"experiments/paper_comparison/large.gin"}


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
    for p in [*TINY, "NUM_LAYERS = 4"]:  # tiles every sweep's layouts (the recall hybrids are 4 long: KSKG)
        args += ["--gin_param", p]
    table = _tool("sweep").main(args)
    variants = list(configurables.read_sweep(name(path)).variants)
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()[2:]]
    assert rows[: len(variants)] == variants  # one row per variant, then the reference rows
    for variant in variants:
        assert (tmp_path / variant / "seed0" / "final_metrics.json").exists()
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
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:6] == ["variant", "seeds", "parameters", "tokens per s", "test loss", "test accuracy"]
    assert head[-1] == "test accuracy / ceiling"
    refs = References.from_dict(json.loads((tmp_path / "references.json").read_text())["sessa"])
    assert refs.num_examples == 4 and refs.task == "SymbolSoup 30-50 tokens"
    for line, variant in zip(lines[2:4], ("sessa", "attention")):
        row = [c.strip() for c in line.strip("|").split("|")]
        accs = [read_final(tmp_path / variant / f"seed{s}")["test"]["accuracy"] for s in (0, 1)]
        mean = sum(accs) / 2
        assert row[:2] == [variant, "2"] and row[5].startswith(f"{mean:.4f} ± ")
        assert row[-1] == f"{mean / refs.ceiling['accuracy'].value:.3f}"
    for label, value in refs.row_values().items():  # chance, best shortcut, ceiling: value and its fraction
        row = [c.strip() for c in next(x for x in lines if x.startswith(f"| {label} |")).strip("|").split("|")]
        assert row[5] == refs.rows()[label]["accuracy"] and row[-1] == f"{value / refs.ceiling['accuracy'].value:.3f}"
    assert (tmp_path / "comparison.png").stat().st_size > 0
    mtime = (tmp_path / "sessa" / "seed0" / "final_metrics.json").stat().st_mtime
    assert sweep.main(args) == table
    assert (tmp_path / "sessa" / "seed0" / "final_metrics.json").stat().st_mtime == mtime


@pytest.mark.parametrize("size", ["cpu", "large"])
@pytest.mark.parametrize("task", ["symbol_soup", "diffuse_mqar"])
def test_paper_comparison_is_parameter_matched(task, size):
    spec = configurables.read_sweep(f"experiments/paper_comparison/{task}_sweep.gin")
    assert list(spec.variants) == PAPER
    large = ["experiments/paper_comparison/large.gin"] if size == "large" else []
    counts, patterns = {}, {}
    for variant, files in spec.variants.items():
        gin_config.parse([*spec.gin_files, *files, *large], spec.gin_params)
        model = gin_config.build_model()
        counts[variant] = sum(p.numel() for p in model.parameters())
        patterns[variant] = model.stack.pattern
    depth = 8 if size == "large" else 4
    assert patterns == {v: (layout * depth)[:depth] for v, layout in zip(PAPER, ["S", "A", "M", "SA", "SM", "N"])}
    assert all(abs(n / counts["sessa"] - 1) <= 0.05 for n in counts.values()), counts  # within 5% of Sessa
    assert (4e6 if size == "large" else 1.4e5) < counts["sessa"] < (6e6 if size == "large" else 1.7e5)


def test_large_overrides_the_cpu_task_and_budget():
    """large.gin, given after a sweep's files, wins over the CPU task lengths and budget."""
    gin_config.parse(["experiments/paper_comparison/symbol_soup.gin", "experiments/paper_comparison/sessa.gin",
                      "experiments/paper_comparison/large.gin"])
    config, task = configurables.configured_train_config(), configurables.configured_task()
    assert (task.min_tokens, task.max_tokens, config.steps, config.final_eval_examples) == (400, 600, 20000, None)
    gin_config.parse(["experiments/paper_comparison/symbol_soup.gin", "experiments/paper_comparison/sessa.gin"])
    config, task = configurables.configured_train_config(), configurables.configured_task()
    assert (task.min_tokens, task.max_tokens, config.steps, config.final_eval_examples) == (100, 150, 400, 1000)
