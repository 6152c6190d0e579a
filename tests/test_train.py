"""Training: a tiny run on every task lowers the loss; resume continues bit-exactly; gradient
accumulation equals one big batch; the run folder, evaluation tool and error messages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.faults import Crash, crash_at
from zoo import gin_config
from zoo.train import checkpoint, configurables
from zoo.train.checkpoint import CheckpointMismatchError
from zoo.train.loop import TrainStream, train
from zoo.train.optim import warmup_cosine
from zoo.train.run_dir import read_final, read_metrics

ROOT = Path(__file__).resolve().parent.parent

TINY_MODEL = ["DIM = 16", "NUM_LAYERS = 2", "LAYOUT = 'SA'", "Sessa.num_heads = 2", "Attention.num_heads = 2"]
TINY_TRAIN = ["TrainConfig.batch_size = 8", "TrainConfig.eval_examples = 16", "TrainConfig.final_eval_examples = 16",
              "TrainConfig.final_splits = ('validation',)", "TrainConfig.log_every = 1",
              "TrainConfig.checkpoint_every = 0", "cosine_schedule.warmup_steps = 0"]
TINY_TASKS = {
    "symbol_soup": ["SymbolSoup.min_tokens = 30", "SymbolSoup.max_tokens = 50", "SymbolSoup.num_train = 16",
                    "SymbolSoup.num_validation = 16", "SymbolSoup.num_test = 16"],
    "diffuse_mqar": ["DiffuseMQAR.num_pairs = 2", "DiffuseMQAR.num_queries = 2", "DiffuseMQAR.key_vocab_size = 8",
                     "DiffuseMQAR.value_vocab_size = 8", "VOCAB = 17", "DiffuseMQAR.lag_range = (3, 18)",
                     "DiffuseMQAR.num_train = 16", "DiffuseMQAR.num_validation = 16", "DiffuseMQAR.num_test = 16"],
    "mqar": ["VOCAB = 32", "MQAR.seq_len = 16", "MQAR.num_pairs = 2", "MQAR.num_train = 16",
             "MQAR.num_validation = 16", "MQAR.num_test = 16"],
    "text_lm": ["TextLM.seq_len = 32"],
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and with pytest-xdist workers
    (or other jobs) sharing 2 cores, extra OpenMP threads make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(task: str, *params: str) -> list[str]:
    return [*TINY_MODEL, *TINY_TRAIN, *TINY_TASKS[task], *params]


def run(run_dir: Path, task: str, *params: str, resume: bool = False, optimizer=None) -> dict:
    """Train from train/tasks/<task>.gin with the tiny overrides plus `params`."""
    gin_config.parse([f"train/tasks/{task}.gin"], tiny(task, *params))
    config = configurables.configured_train_config()
    if optimizer is not None:
        config.optimizer = optimizer
    return train(config, gin_config.build_model, configurables.configured_task(), run_dir, resume=resume,
                 operative_config=gin_config.operative_config)


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


@pytest.mark.parametrize("task", sorted(TINY_TASKS))
def test_tiny_run_decreases_loss(tmp_path, task):
    result = run(tmp_path, task, "TrainConfig.steps = 30", "adamw.lr = 1e-2")
    losses = result["train_losses"]
    assert len(losses) == 30 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.85 * first, f"{task}: loss {first:.3f} -> {last:.3f}"


def test_run_folder_and_evaluate_tool(tmp_path, capsys):
    result = run(tmp_path, "symbol_soup", "TrainConfig.steps = 4", "TrainConfig.eval_every = 2",
                 "TrainConfig.checkpoint_every = 2", "TrainConfig.final_splits = ('validation', 'test')")
    assert {p.name for p in tmp_path.iterdir()} == {"config.gin", "metrics.jsonl", "final_metrics.json",
                                                   "checkpoints", "plots"}
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"loss.png", "metrics.png"}
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002", "step_00000004"]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["split"] == "validation"] == [2, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "examples_seen"} <= set(records[0])
    final = read_final(tmp_path)
    assert final["parameters"] == result["parameters"] > 0 and final["tokens_per_s"] > 0
    assert {"loss", "accuracy"} <= set(final["test"])
    # the operative config alone rebuilds the run
    text = (tmp_path / "config.gin").read_text()
    assert "build_task.task = @SymbolSoup" in text and "SymbolSoup.max_tokens = 50" in text

    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    metrics = tool.main([str(tmp_path), "--split", "test", "--max_examples", "16"])
    assert metrics == pytest.approx(final["test"], abs=1e-6)
    assert "| test |" in capsys.readouterr().out


def test_resume_reproduces_losses_exactly(tmp_path):
    params = ["TrainConfig.steps = 8", "TrainConfig.checkpoint_every = 3", "adamw.lr = 1e-2",
              "cosine_schedule.warmup_steps = 2", "TrainConfig.keep_checkpoints = 5", "TrainConfig.log_every = 2"]
    full = run(tmp_path / "full", "symbol_soup", *params)

    with pytest.raises(Crash):
        run(tmp_path / "cut", "symbol_soup", *params, optimizer=crash_at(5))
    assert checkpoint.latest(tmp_path / "cut" / "checkpoints").name == "step_00000003"
    with pytest.raises(FileExistsError, match="pass --resume"):
        run(tmp_path / "cut", "symbol_soup", *params)
    resumed = run(tmp_path / "cut", "symbol_soup", *params, resume=True)

    assert resumed["train_losses"] == full["train_losses"][3:]  # bit-exact, not approximately
    # logged every 2 steps: the record of step 4 averages step 4 with step 3, from before the crash
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")
    assert [r["step"] for r in read_metrics(tmp_path / "cut") if r["split"] == "train"] == [2, 4, 6, 8]
    a = checkpoint.load_weights(checkpoint.latest(tmp_path / "full" / "checkpoints") / checkpoint.WEIGHTS)
    b = checkpoint.load_weights(checkpoint.latest(tmp_path / "cut" / "checkpoints") / checkpoint.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_final(tmp_path / "cut")["validation"] == read_final(tmp_path / "full")["validation"]


def test_resume_with_other_model_names_mismatched_tensors(tmp_path):
    run(tmp_path, "symbol_soup", "TrainConfig.steps = 1")
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch .*embed\.weight: checkpoint \(26, 16\) vs model \(26, 24\)"):
        run(tmp_path, "symbol_soup", "TrainConfig.steps = 2", "DIM = 24", resume=True)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    params = ["TrainConfig.steps = 3", "adamw.lr = 1e-2", "TrainConfig.final_splits = ()"]
    one = run(tmp_path / "a1", "diffuse_mqar", *params)["train_losses"]
    four = run(tmp_path / "a4", "diffuse_mqar", *params, "TrainConfig.grad_accum = 4")["train_losses"]
    assert four == pytest.approx(one, abs=1e-5)


def test_bf16_autocast_on_cpu(tmp_path):
    result = run(tmp_path, "diffuse_mqar", "TrainConfig.steps = 2", "TrainConfig.precision = 'bf16'",
                 "LAYOUT = 'SAM'", "NUM_LAYERS = 3", "Mamba2.head_dim = 8", "Mamba2.state_dim = 8")
    assert all(0 < loss < 10 for loss in result["train_losses"])


def test_model_task_mismatch_is_explained(tmp_path):
    with pytest.raises(ValueError, match="set VOCAB = 26"):
        run(tmp_path, "symbol_soup", "VOCAB = 20", "TrainConfig.steps = 1")
    with pytest.raises(ValueError, match="set NUM_CLASSES = 20"):
        run(tmp_path, "symbol_soup", "NUM_CLASSES = 10", "TrainConfig.steps = 1")
    with pytest.raises(ValueError, match="divisible by grad_accum"):
        run(tmp_path, "symbol_soup", "TrainConfig.grad_accum = 3", "TrainConfig.steps = 1")


def test_data_stream_covers_each_epoch_once():
    stream = TrainStream(10, seed=3)
    first, second = stream.indices(0, 10), stream.indices(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert stream.indices(7, 6) == first[7:] + second[:3]
    assert TrainStream(10, seed=3).indices(12, 4) == second[2:6]


def test_warmup_cosine_schedule():
    lr = [warmup_cosine(s, total_steps=10, warmup_steps=2, min_ratio=0.1) for s in range(12)]
    assert lr[:3] == [0.5, 1.0, 1.0]
    assert lr[2:11] == sorted(lr[2:11], reverse=True) and lr[10] == lr[11] == pytest.approx(0.1)
