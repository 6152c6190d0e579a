"""Every shipped gin file parses, finalizes, builds and runs one forward and backward pass.

The rule (docs/assembly.md): a file declares what it needs with `include` (and `import` for
configurables registered outside zoo.gin_config), and is tested according to what it includes:
  * configs/base/*.gin are abstract: alone they must fail, naming a `%gin.REQUIRED` macro, and
    each is included by at least one file in configs/;
  * a model file includes a base (configs/*.gin, train task files, ...): it builds on its own, or,
    if it leaves the layout and size open, with the layout and size of configs/default.gin after it;
  * every other file is an overlay (size, mixer layout, hybrid, backends, ...): it is built on top
    of configs/default.gin.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import kernels
from blocks.mixer import Mixer
from zoo import gin_config

CONFIGS = gin_config.CONFIGS_DIR
ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.gin"))
REQUIRED_LEFT = r"set to `%gin.REQUIRED` but not subsequently overridden"


def includes(name: str) -> list[str]:
    """Every file `name` includes, transitively, in order."""
    found = []
    for inc in re.findall(r"^include\s+'([^']+)'", (CONFIGS / name).read_text(), flags=re.M):
        found += [inc, *includes(inc)]
    return found


BASES = [f for f in ALL if f.startswith("base/")]
MODELS = [f for f in ALL if f not in BASES and any(i.startswith("base/") for i in includes(f))]
OVERLAYS = [f for f in ALL if f not in BASES and f not in MODELS]
# what a model file that leaves them open gets: default.gin's own layout and size files
FILLERS = [f for f in re.findall(r"^include\s+'([^']+)'", (CONFIGS / "default.gin").read_text(), flags=re.M)
           if not f.startswith("base/")]


def build_and_run(files: list[str]) -> None:
    gin_config.parse(files)
    model = gin_config.build_model()
    for module in model.modules():  # a pinned backend this machine cannot run: skip with its reason
        if isinstance(module, Mixer):
            for op, backend in module.ops.items():
                if backend != kernels.AUTO and (why := kernels.get_op(op).backends[backend].unavailable_reason()):
                    pytest.skip(f"{files}: {op} backend {backend!r} unavailable here: {why}")
    args, kwargs = model.example_inputs(batch_size=2, seq_len=12)
    out = model(*args, **kwargs)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert "build_model.model" in gin_config.operative_config()


def test_the_files_are_found():
    assert {"default.gin", "classifier.gin"} <= set(MODELS) and {"base/lm.gin", "base/classifier.gin"} <= set(BASES)
    assert {"sizes/tiny.gin", "mixers/sessa.gin", "hybrids/sessa_attention.gin", "backends/reference.gin"} <= set(OVERLAYS)
    assert FILLERS == ["hybrids/sessa_attention.gin", "sizes/tiny.gin"]


@pytest.mark.parametrize("base", BASES)
def test_base_is_abstract_and_used(base):
    with pytest.raises(ValueError, match=REQUIRED_LEFT):
        gin_config.parse([base])
    assert any(base in includes(f) for f in MODELS), f"no model file in configs/ includes {base}"


@pytest.mark.parametrize("model", MODELS)
def test_model_file_builds(model):
    try:
        gin_config.parse([model])
    except ValueError as e:
        if not re.search(REQUIRED_LEFT, str(e)):
            raise
        build_and_run([model, *FILLERS])
    else:
        build_and_run([model])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_on_default(overlay):
    build_and_run(["default.gin", overlay])


def test_params_override_files_and_search_path():
    gin_config.parse([str(CONFIGS / "default.gin")], ["DIM = 32", "LAYOUT = 'MA'", "NUM_LAYERS = 2"])
    model = gin_config.build_model()
    assert model.dim == 32 and model.stack.pattern == "MA"


def test_command_line_arguments():
    import argparse

    parser = gin_config.add_gin_args(argparse.ArgumentParser())
    args = parser.parse_args(["--gin_file=default.gin", "--gin_file=mixers/attention.gin", "--gin_param=NUM_LAYERS = 2"])
    gin_config.parse_args(args)
    assert gin_config.build_model().stack.pattern == "AA"
    gin_config.parse_args(parser.parse_args([]), default_files=["default.gin"])
    assert gin_config.build_model().stack.pattern == "SASA"


def test_tools_run(capsys, tmp_path):
    import runpy

    demo = [f"--gin_param={p}" for p in ("TrainConfig.steps = 1", "TrainConfig.batch_size = 2", "TrainConfig.eval_every = 0",
                                         "TrainConfig.checkpoint_every = 0", "TrainConfig.eval_examples = 2",
                                         "TrainConfig.final_eval_examples = 2", "SymbolSoup.min_tokens = 30",
                                         "SymbolSoup.max_tokens = 50")] + ["--run_dir", str(tmp_path)]
    runpy.run_path(str(CONFIGS.parent / "tools" / "info.py"))["main"](["--gin_file=default.gin"])
    info = capsys.readouterr().out
    gin_config.parse(["default.gin"])
    params = sum(p.numel() for p in gin_config.build_model().parameters())
    assert "pattern SASA" in info and f"total: {params:,} params" in info  # the model default.gin builds
    assert all(f" {symbol}  {name} " in info for symbol, name in [("S", "sessa"), ("A", "attention"), ("M", "mamba2")])

    final = runpy.run_path(str(CONFIGS.parent / "tools" / "demo.py"))["main"](demo)
    out = capsys.readouterr().out
    for split in ("validation", "test"):  # the metrics it printed are the run's final metrics, and plausible
        metrics = final[split]
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 < metrics["loss"] < 20.0
        assert f"| {split} | " + " | ".join(f"{value:.4f}" for value in metrics.values()) + " |" in out
    assert json.loads((tmp_path / "final_metrics.json").read_text())["test"] == final["test"]
