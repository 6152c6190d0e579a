"""An on/off setting the ops read on every call: an environment variable for the whole process,
overridden inside `enabled()` blocks (per thread; the innermost block wins).

    CHECKS = Switch("ZOO_CHECK_VALUES", default=False)
    CHECKS.active()                      # the innermost block's setting, else the variable's
    with CHECKS.enabled(False): ...      # off inside the block

The variable: unset or empty = `default`; 0, off, false or no = off; anything else = on.
kernels.value_checks and kernels.nan_policy are the two switches.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator


class Switch:
    def __init__(self, env: str, default: bool):
        self.env = env
        self.default = default
        self._local = threading.local()

    def active(self) -> bool:
        """The innermost `enabled()` block's setting in this thread, else the environment variable's."""
        stack = getattr(self._local, "stack", None)
        if stack:
            return stack[-1]
        value = os.environ.get(self.env, "").strip().lower()
        return self.default if value == "" else value not in ("0", "off", "false", "no")

    @contextlib.contextmanager
    def enabled(self, on: bool = True) -> Iterator[None]:
        """Set the switch to `on` inside the block (this thread only)."""
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(bool(on))
        try:
            yield
        finally:
            stack.pop()
