"""The bad-input matrix shared by tests/test_bad_inputs*.py: one table of cases, grouped.

A case calls the library (or a command-line tool) with one bad input and states what must happen:
the exception type, and the words its message must contain (the argument or the file at fault).
Groups: "data_loss" (runs and checkpoints: the bytes on disk are checked as well), "silent"
(inputs that used to give a wrong result without a word), "unclear" (inputs that used to fail
with a message that did not say what was wrong) and "security". A new group is one more
`GROUPS[...] = [...]` entry; tests/test_bad_inputs.py runs every case of every group.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

GROUP_NAMES = ("data_loss", "silent", "unclear", "security")


@dataclass(frozen=True)
class Bad:
    """One bad input: `call()` must raise `raises` with every string of `names` in its message."""

    id: str
    call: Callable[[], object]
    raises: type[BaseException]
    names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if isinstance(self.names, str):
            object.__setattr__(self, "names", (self.names,))
        assert self.names, f"{self.id}: a case must say which argument or file its message names"


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_message(case_id: str, error: BaseException, names: tuple[str, ...]) -> None:
    message = str(error)
    missing = [n for n in names if n not in message]
    assert not missing, f"{case_id}: the message does not name {missing}:\n{message}"
