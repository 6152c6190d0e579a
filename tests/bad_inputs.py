"""The bad-input matrix shared by tests/test_bad_inputs*.py: tables of cases, one per group.

A case calls the library (or a command-line tool) with one bad input and states what must happen:
the exception type, and the words its message must contain (the argument or the file at fault).
Groups: "data_loss" (runs and checkpoints: the bytes on disk are checked as well;
test_bad_inputs_runs.py), "silent" (inputs that gave a wrong result without a word), "unclear"
(inputs that failed with a message that did not say what was wrong), "security" and "nan" (NaN
and inf inputs, test_bad_inputs_nan.py). A new group is one more table: a list of `Bad` cases in
its own test_bad_inputs_<group>.py, run with `run_case`, and one more entry in
`test_matrix_covers_every_group` (test_bad_inputs.py). A case whose input is valid but must give a
checked result (NaN in, NaN out at the same positions) sets `raises=None` and an `expect(result)`
that asserts it.

A command-line case raises SystemExit: its stderr must end with one `<tool>.py: error: ...` line
(status 1) or argparse's usage error (status 2), without a traceback, naming the argument.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Ctx:
    """What a case may use: a fresh temporary folder, and (built once per session) a finished run."""

    tmp: Path
    run_folder: Callable[[], Path]


@dataclass(frozen=True)
class Bad:
    """One bad input: `call(ctx)` must raise `raises` with every string of `names` in its message
    (or, with raises=None, return a result that `expect(result)` accepts)."""

    id: str
    call: Callable[[Ctx], object]
    raises: type[BaseException] | None
    names: tuple[str, ...] = field(default_factory=tuple)
    absent: tuple[str, ...] = ()  # words the message must not contain
    expect: Callable[[object], None] | None = None

    def __post_init__(self):
        if isinstance(self.names, str):
            object.__setattr__(self, "names", (self.names,))
        if self.raises is None:
            assert self.expect is not None, f"{self.id}: a case that raises nothing must check its result"
        else:
            assert self.names, f"{self.id}: a case must say which argument or file its message names"


def run_case(case: Bad, ctx: Ctx, capsys) -> None:
    """Call the case; check the exception type and that its message (stderr for a tool) names the
    culprit, or, for a case that must not raise, check its result."""
    capsys.readouterr()
    if case.raises is None:
        case.expect(case.call(ctx))
        return
    with pytest.raises(case.raises) as info:
        case.call(ctx)
    if isinstance(info.value, SystemExit):
        err = capsys.readouterr().err
        assert info.value.code in (1, 2), f"{case.id}: exit status {info.value.code}"
        assert "Traceback" not in err, f"{case.id}: a traceback reached the user:\n{err}"
        if info.value.code == 1:  # informational lines may come first; the error is the one last line
            errors = [line for line in err.splitlines() if ".py: error: " in line]
            assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], f"{case.id}: not one line:\n{err}"
        text = err
    else:
        text = str(info.value)
    check_message(case.id, text, case.names)
    present = [w for w in case.absent if w in text]
    assert not present, f"{case.id}: the message must not say {present}:\n{text}"


def check_message(case_id: str, message: str | BaseException, names: tuple[str, ...]) -> None:
    message = str(message)
    missing = [n for n in names if n not in message]
    assert not missing, f"{case_id}: the message does not name {missing}:\n{message}"


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


_TOOLS: dict[str, object] = {}


def tool(name: str):
    """tools/<name>.py as a module (loaded once)."""
    if name not in _TOOLS:
        spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TOOLS[name] = module
    return _TOOLS[name]


def cli(name: str, *argv: str) -> None:
    """Run tools/<name>.py through its command-line entry point (SystemExit carries the status)."""
    module = tool(name)
    module.cli.run(module.main, [str(a) for a in argv])


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    """Set environment variables inside the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- fixtures

TINY_RUN = ["DIM = 16", "NUM_LAYERS = 2", "LAYOUT = 'SA'", "Sessa.num_heads = 2", "Attention.num_heads = 2",
            "SymbolSoup.min_tokens = 20", "SymbolSoup.max_tokens = 30", "SymbolSoup.num_train = 8",
            "SymbolSoup.num_validation = 4", "SymbolSoup.num_test = 4", "TrainConfig.batch_size = 4",
            "TrainConfig.eval_examples = 4", "TrainConfig.final_eval_examples = 4", "TrainConfig.steps = 2",
            "TrainConfig.final_splits = ('validation',)", "cosine_schedule.warmup_steps = 0"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A tiny SymbolSoup run of 2 steps (config.gin, metrics, one checkpoint), made once per session."""
    import torch

    from zoo import gin_config
    from zoo.train import configurables
    from zoo.train.loop import train

    folder = tmp_path_factory.mktemp("bad_inputs") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gin_config.parse(["train/tasks/symbol_soup.gin"], TINY_RUN)
        train(configurables.configured_train_config(), gin_config.build_model, configurables.configured_task(), folder,
              operative_config=gin_config.operative_config)
    finally:
        gin_config.clear()
        torch.set_num_threads(threads)
    return folder


@pytest.fixture
def ctx(tmp_path, request) -> Ctx:
    return Ctx(tmp_path, lambda: request.getfixturevalue("finished_run"))
