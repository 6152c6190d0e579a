"""The data-loss group of the bad-input matrix: resumes, divergence, re-runs and torn logs.

Every case starts from a copy of a real run folder (finished, killed mid-run, or killed before its
first checkpoint), does one risky thing, and checks the bytes on disk: the files it must not touch
keep their sha256 (every checkpoint file, `latest`, final_metrics.json, metrics.jsonl, config.gin),
and a log that may grow keeps its old bytes as a prefix.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.bad_inputs import check_message, tree_hashes
from tests.faults import Crash, crash_at, poison_weights_after
from zoo import gin_config
from zoo.train import checkpoint, configurables
from zoo.train.loop import train
from zoo.train.optim import warmup_cosine
from zoo.train.run_dir import read_final, read_metrics

ROOT = Path(__file__).resolve().parent.parent

TINY = ["DIM = 16", "NUM_LAYERS = 2", "LAYOUT = 'SA'", "Sessa.num_heads = 2", "Attention.num_heads = 2",
        "SymbolSoup.min_tokens = 20", "SymbolSoup.max_tokens = 30", "SymbolSoup.num_train = 16",
        "SymbolSoup.num_validation = 8", "SymbolSoup.num_test = 8",
        "TrainConfig.batch_size = 4", "TrainConfig.eval_examples = 8", "TrainConfig.final_eval_examples = 8",
        "TrainConfig.final_splits = ('validation',)", "TrainConfig.log_every = 1", "TrainConfig.eval_every = 2",
        "TrainConfig.checkpoint_every = 2", "TrainConfig.keep_checkpoints = 5", "cosine_schedule.warmup_steps = 0",
        "adamw.lr = 1e-2"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(run_dir: Path, *params: str, optimizer=None, model_hook=None, **kwargs) -> dict:
    """Train tiny SymbolSoup into run_dir with `params` over TINY (kwargs go to `train`)."""
    gin_config.parse(["train/tasks/symbol_soup.gin"], [*TINY, *params])
    config = configurables.configured_train_config()
    if optimizer is not None:
        config.optimizer = optimizer

    def build():
        model = gin_config.build_model()
        return model_hook(model) if model_hook else model

    return train(config, build, configurables.configured_task(), run_dir,
                 operative_config=gin_config.operative_config, **kwargs)


def nan_gradient_in_call(call: int, value: float = float("nan")):
    """A model hook: the gradient of one weight is non-finite in the `call`-th backward pass only."""

    def hook(model):
        counter = [0]

        def on_grad(grad):
            counter[0] += 1
            return grad * value if counter[0] == call else grad

        next(model.parameters()).register_hook(on_grad)
        return model

    return hook


# ----------------------------------------------------------------------------- base runs (made once)

@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """finished: 4 steps, checkpoints at 2 and 4, final_metrics.json.
    killed: checkpoint at 2, killed in step 3 (records of steps 1-2 logged).
    killed_early: killed in step 2, before any checkpoint (config.gin and metrics.jsonl only)."""
    root = tmp_path_factory.mktemp("bases")
    torch.set_num_threads(1)
    gin_config.clear()
    run(root / "finished", "TrainConfig.steps = 4")
    with pytest.raises(Crash):
        run(root / "killed", "TrainConfig.steps = 6", optimizer=crash_at(3))
    with pytest.raises(Crash):
        run(root / "killed_early", "TrainConfig.steps = 6", "TrainConfig.checkpoint_every = 0", optimizer=crash_at(2))
    gin_config.clear()
    assert (root / "killed_early" / "metrics.jsonl").is_file()
    assert not (root / "killed_early" / "checkpoints").exists()
    return {p.name: p for p in root.iterdir()}


# ----------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class DataLoss:
    """Copy base run `base` to `run_dir`, call `act(run_dir)`; it must raise `raises` (None: succeed)
    with `names` in the message (or, when it succeeds, in the output). Then every file matching a
    glob of `unchanged` has its old bytes, and every file in `grows` keeps its old bytes as a prefix."""

    id: str
    base: str
    act: Callable[[Path], object]
    raises: type[BaseException] | None
    names: tuple[str, ...]
    unchanged: tuple[str, ...] = ("**/*",)
    grows: tuple[str, ...] = ()
    check: Callable[..., None] | None = field(default=None)  # check(run_dir, parent, before, base_dir)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli(tool: str, *argv: str) -> None:
    """Run tools/<tool>.py through its command-line entry point (SystemExit carries the exit code)."""
    module = _load_tool(tool)
    module.cli.run(module.main, list(argv))


def _no_nonfinite_checkpoint(run_dir: Path, *_) -> None:
    for ckpt in checkpoint.list_checkpoints(run_dir / "checkpoints"):
        weights = checkpoint.load_weights(ckpt / checkpoint.WEIGHTS)
        assert all(torch.isfinite(t).all() for t in weights.values()), f"{ckpt} holds non-finite weights"


def _skipped_step_logged(run_dir: Path, *_) -> None:
    records = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert [r["step"] for r in records if r.get("skipped_steps")] == [6], records
    assert read_final(run_dir)["skipped_steps"] == 1
    _no_nonfinite_checkpoint(run_dir)


def _continued_to_6(run_dir: Path, _parent: Path, before: dict[str, str], _base: Path) -> None:
    kept = tree_hashes(run_dir)["config.step_00000004.gin"]
    assert kept == before["config.gin"], "the config that trained steps 1-4 must be kept beside the new one"
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")][-1] == "step_00000006"
    assert read_final(run_dir)["step"] == 6
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    # the schedule is re-evaluated for 6 steps from the checkpoint's step on (docs/training.md)
    lrs = {r["step"]: r["lr"] for r in read_metrics(run_dir) if r["split"] == "train"}
    assert lrs[5] == pytest.approx(1e-2 * warmup_cosine(4, total_steps=6, min_ratio=0.1), rel=1e-9)
    assert lrs[4] == pytest.approx(1e-2 * warmup_cosine(3, total_steps=4, min_ratio=0.1), rel=1e-9)


def _final_evaluation_redone(run_dir: Path, _parent: Path, before: dict[str, str], base: Path) -> None:
    """Killed during the final evaluation: only that runs again, its record is not duplicated."""
    assert read_final(run_dir)["validation"] == read_final(base)["validation"]
    assert read_metrics(run_dir) == read_metrics(base)


def _set_aside_kept(run_dir: Path, parent: Path, before: dict[str, str], _base: Path) -> None:
    aside = [p for p in parent.iterdir() if p.name.startswith(run_dir.name + ".set-aside-")]
    assert len(aside) == 1, list(parent.iterdir())
    assert tree_hashes(aside[0]) == before, "the set-aside folder must hold the old run unchanged"
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == [1, 2]  # a fresh run, not mixed


def _torn_line_trimmed(run_dir: Path, _parent: Path, _before: dict[str, str], base: Path) -> None:
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.startswith((base / "metrics.jsonl").read_text()), "the records before the torn line must stay"
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    assert [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"] == [1, 2, 3, 4]


_BEFORE: dict[Path, dict[str, str]] = {}


def _write_torn_line(run_dir: Path) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "spl')  # killed half-way through an append


def _corrupt_middle_line(run_dir: Path) -> None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "{not json\n"
    (run_dir / "metrics.jsonl").write_text("".join(lines))


def _write_newer_checkpoint_twice(run_dir: Path) -> None:
    weights = checkpoint.load_weights(run_dir / "checkpoints" / "step_00000004" / checkpoint.WEIGHTS)
    checkpoint.write(run_dir / "checkpoints", 4, {k: v + 1 for k, v in weights.items()}, {"step": 4})


def _write_older_checkpoint(run_dir: Path) -> None:
    weights = checkpoint.load_weights(run_dir / "checkpoints" / "step_00000004" / checkpoint.WEIGHTS)
    checkpoint.write(run_dir / "checkpoints", 3, weights, {"step": 3})


def _prune_with_nonfinite_newest(run_dir: Path) -> None:
    """Two checkpoints with NaN weights written with keep=1: the newest finite one (step 4) stays."""
    weights = checkpoint.load_weights(run_dir / "checkpoints" / "step_00000004" / checkpoint.WEIGHTS)
    nan = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
    checkpoint.write(run_dir / "checkpoints", 5, nan, {"step": 5}, keep=1)
    checkpoint.write(run_dir / "checkpoints", 6, nan, {"step": 6}, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == ["step_00000004", "step_00000006"]


def _with_only(artefact: str) -> Callable[[Path], object]:
    """Strip a finished run down to one artefact, then re-run into it without --resume."""

    def act(run_dir: Path) -> None:
        for p in list(run_dir.iterdir()):
            if p.name != artefact:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        _BEFORE[run_dir] = tree_hashes(run_dir)
        run(run_dir, "TrainConfig.steps = 2")

    return act


CHECKPOINT_FILES = ("checkpoints/*", "checkpoints/*/*", "final_metrics.json")

CASES = [
    # 1. resuming at or below the checkpoint's step
    DataLoss("resume_finished_run", "finished", lambda d: run(d, "TrainConfig.steps = 4", resume=True),
             None, ("already finished", "step 4")),
    DataLoss("resume_finished_run_cli", "finished", lambda d: _cli("train", "--run_dir", str(d), "--resume"),
             None, ("already finished",)),
    DataLoss("resume_finished_run_without_final_metrics", "finished",
             lambda d: ((d / "final_metrics.json").unlink(), run(d, "TrainConfig.steps = 4", resume=True)),
             None, ("resumed",), unchanged=("checkpoints/*", "checkpoints/*/*", "config.gin"),
             check=_final_evaluation_redone),
    DataLoss("resume_with_fewer_steps", "finished", lambda d: run(d, "TrainConfig.steps = 2", resume=True),
             ValueError, ("step 4", "TrainConfig.steps = 2")),
    DataLoss("resume_with_fewer_steps_than_killed_run", "killed", lambda d: run(d, "TrainConfig.steps = 1", resume=True),
             ValueError, ("step 2", "TrainConfig.steps = 1")),
    DataLoss("resume_with_fewer_steps_cli", "finished",
             lambda d: _cli("train", "--run_dir", str(d), "--resume", "--gin_param", "TrainConfig.steps = 3"),
             SystemExit, ("step 4", "TrainConfig.steps = 3")),
    DataLoss("resume_with_more_steps", "finished", lambda d: run(d, "TrainConfig.steps = 6", resume=True),
             None, ("TrainConfig.steps 4 -> 6",), unchanged=("checkpoints/step_00000002/*", "checkpoints/step_00000004/*"),
             grows=("metrics.jsonl",), check=_continued_to_6),
    DataLoss("checkpoint_write_same_step", "finished", _write_newer_checkpoint_twice, FileExistsError,
             ("step_00000004",)),
    DataLoss("checkpoint_write_older_step", "finished", _write_older_checkpoint, FileExistsError,
             ("step_00000003", "step_00000004")),
    # 2. divergence
    DataLoss("diverging_weights_stop_the_run", "finished",
             lambda d: run(d, "TrainConfig.steps = 8", "TrainConfig.checkpoint_every = 1", "TrainConfig.keep_checkpoints = 2",
                           resume=True, optimizer=poison_weights_after(1)),
             FloatingPointError, ("step 5",), unchanged=CHECKPOINT_FILES, grows=("metrics.jsonl",),
             check=_no_nonfinite_checkpoint),
    DataLoss("nan_gradient_stops_the_run", "finished",
             lambda d: run(d, "TrainConfig.steps = 8", "TrainConfig.checkpoint_every = 1", "TrainConfig.keep_checkpoints = 1",
                           resume=True, model_hook=nan_gradient_in_call(1)),
             FloatingPointError, ("step 5", "gradient norm"), unchanged=CHECKPOINT_FILES, grows=("metrics.jsonl",),
             check=_no_nonfinite_checkpoint),
    DataLoss("inf_gradient_stops_the_run", "finished",
             lambda d: run(d, "TrainConfig.steps = 8", "TrainConfig.grad_clip = None", resume=True,
                           model_hook=nan_gradient_in_call(1, float("inf"))),
             FloatingPointError, ("step 5",), unchanged=CHECKPOINT_FILES, grows=("metrics.jsonl",)),
    DataLoss("nonfinite_steps_skipped_and_counted", "finished",
             lambda d: run(d, "TrainConfig.steps = 8", "TrainConfig.on_nonfinite = 'skip'", resume=True,
                           model_hook=nan_gradient_in_call(2)),
             None, ("skipped",), unchanged=("checkpoints/step_00000002/*", "checkpoints/step_00000004/*"),
             grows=("metrics.jsonl",), check=_skipped_step_logged),
    DataLoss("pruning_keeps_newest_finite_checkpoint", "finished", _prune_with_nonfinite_newest, None, ("",),
             unchanged=("checkpoints/step_00000004/*", "final_metrics.json", "metrics.jsonl")),
    # 3. re-running into a folder that holds a run
    DataLoss("rerun_into_killed_run", "killed_early", lambda d: run(d, "TrainConfig.steps = 6"),
             FileExistsError, ("config.gin", "metrics.jsonl", "--resume", "set_aside")),
    DataLoss("rerun_into_finished_run", "finished", lambda d: run(d, "TrainConfig.steps = 4"),
             FileExistsError, ("final_metrics.json", "--resume")),
    *[DataLoss(f"rerun_into_folder_with_{name.replace('.', '_')}", "finished", _with_only(name), FileExistsError, (name,))
      for name in ("config.gin", "metrics.jsonl", "final_metrics.json", "plots", "checkpoints")],
    DataLoss("rerun_cli_into_killed_run", "killed_early",
             lambda d: _cli("train", "--gin_file", "train/tasks/symbol_soup.gin", "--run_dir", str(d),
                            *sum((["--gin_param", p] for p in TINY), [])),
             SystemExit, ("config.gin", "--resume")),
    DataLoss("resume_without_checkpoint", "killed_early", lambda d: run(d, "TrainConfig.steps = 6", resume=True),
             FileNotFoundError, ("no checkpoint", "set_aside")),
    DataLoss("rerun_set_aside", "killed_early", lambda d: run(d, "TrainConfig.steps = 2", set_aside=True),
             None, ("set aside",), unchanged=(), check=_set_aside_kept),
    # 4. a torn last line of metrics.jsonl
    DataLoss("resume_after_torn_metrics_line", "killed",
             lambda d: (_write_torn_line(d), run(d, "TrainConfig.steps = 4", resume=True)),
             None, ("metrics.jsonl",), unchanged=("checkpoints/step_00000002/*",), check=_torn_line_trimmed),
    DataLoss("corrupt_metrics_line_in_the_middle", "killed",
             lambda d: (_corrupt_middle_line(d), _BEFORE.__setitem__(d, tree_hashes(d)),
                        run(d, "TrainConfig.steps = 4", resume=True)),
             ValueError, ("metrics.jsonl", "line 2")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_data_loss(case: DataLoss, bases, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(bases[case.base], run_dir)
    _BEFORE[run_dir] = tree_hashes(run_dir)
    old_bytes = {name: (run_dir / name).read_bytes() for name in case.grows}
    if case.raises is None:
        case.act(run_dir)
        out = capsys.readouterr()
        text = out.out + out.err
        missing = [n for n in case.names if n not in text]
        assert not missing, f"{case.id}: the output does not mention {missing}:\n{text}"
    else:
        with pytest.raises(case.raises) as info:
            case.act(run_dir)
        if isinstance(info.value, SystemExit):  # a command-line tool: one line on stderr, exit code 1
            assert info.value.code == 1
            err = capsys.readouterr().err
            assert err.startswith("train.py: error:") and "Traceback" not in err, err
            check_message(case.id, RuntimeError(err), case.names)
        else:
            check_message(case.id, info.value, case.names)
    before = _BEFORE.pop(run_dir)  # a case that prepares the folder first records its own "before"
    after = tree_hashes(run_dir) if run_dir.exists() else {}
    protected = [f for f in before if any(pattern == "**/*" or fnmatch.fnmatch(f, pattern) for pattern in case.unchanged)]
    changed = sorted(f for f in protected if after.get(f) != before[f])
    assert not changed, f"{case.id}: these files changed or vanished: {changed}"
    for name, old in old_bytes.items():
        assert (run_dir / name).read_bytes().startswith(old), f"{case.id}: {name} lost some of its old bytes"
    if case.check is not None:
        case.check(run_dir, tmp_path, before, bases[case.base])
