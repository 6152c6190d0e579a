"""The debug switch for op input checks that look at the values (and so wait for the device).

Every op checks the shapes, dtypes and devices of its inputs on every call: that is free. Checks
on the values themselves (Sessa's gain |gamma| < 1, Mamba-2's A <= 0 and dt >= 0, segment ids
that are contiguous in time) read the data, which on a GPU stalls the stream once per call, so
they are off by default. Turn them on while debugging:

    ZOO_CHECK_VALUES=1 python tools/train.py ...     # for a whole process
    with value_checks.enabled():                     # for a block of code
        y = model(x)

The models check what they are given (tokens, segment ids) on every call either way.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

_local = threading.local()


def active() -> bool:
    """Whether op-level value checks run now (innermost `enabled()` block, else ZOO_CHECK_VALUES)."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return os.environ.get("ZOO_CHECK_VALUES", "") not in ("", "0")


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Run op-level value checks inside the block (or, with on=False, skip them)."""
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(bool(on))
    try:
        yield
    finally:
        stack.pop()
