"""Backend dispatch: one `Op` per mathematical function, several ranked backends per op.

A backend declares a name, a priority, a lazy availability `probe()` and a `supports(*args, **kwargs)`
check; both return `None` when fine or a short reason string ("needs CUDA", "float64 not
supported"). Dispatch picks the highest-priority backend that is available and supports the
inputs, and logs the choice once per (op, backend). An optional `auto(*args, **kwargs)` check declines
only automatic selection (a pinned backend still runs), e.g. Triton's slow CPU interpreter.
An exception raised by a probe or a check becomes that backend's reason; it never escapes dispatch.

Pinning, strongest first:
    op(..., backend="sdpa")                     # per call (mixers pass their per-layer choice)
    with use_backends(attention="reference"):    # per block of code
    set_backend("attention", "sdpa")             # process-wide
    ZOO_BACKENDS="attention=sdpa,ssd=chunked"    # environment
A pinned backend that cannot run raises `BackendError` listing every backend and its reason.

Registering a backend from user code is one decorator:

    from kernels import attention
    @attention.register("mine", priority=50, supports=lambda q, k, v, **kw: None)
    def my_attention(q, k, v, **kw): ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

log = logging.getLogger("kernels")

Reason = str | None
AUTO = "auto"


class BackendError(RuntimeError):
    """No backend can run these inputs, or a pinned backend cannot."""


@dataclass
class Backend:
    """One implementation of an op."""

    op: str
    name: str
    fn: Callable[..., Any]
    priority: int
    probe: Callable[[], Reason]
    supports: Callable[..., Reason]
    auto: Callable[..., Reason] = field(default=lambda *args, **kwargs: None, repr=False)
    _availability: tuple[Reason] | None = field(default=None, repr=False)

    def unavailable_reason(self) -> Reason:
        """Why this backend cannot run at all here (probed once, lazily), or None."""
        if self._availability is None:
            try:
                reason = self.probe()
            except Exception as e:  # a probe that crashes means unavailable, never an import error
                reason = f"probe failed: {type(e).__name__}: {e}"
            self._availability = (reason,)
        return self._availability[0]

    def reason(self, *args: Any, **kwargs: Any) -> Reason:
        """Why this backend cannot run these inputs, or None if it can."""
        return self.unavailable_reason() or _checked("supports", self.supports, args, kwargs)

    def auto_reason(self, *args: Any, **kwargs: Any) -> Reason:
        """Why automatic selection skips this backend for these inputs (pinned, it may still run)."""
        return self.reason(*args, **kwargs) or _checked("auto", self.auto, args, kwargs)


def _checked(what: str, check: Callable[..., Reason], args: tuple, kwargs: dict) -> Reason:
    """Run a `supports`/`auto` check; an exception inside it becomes the reason."""
    try:
        return check(*args, **kwargs)
    except Exception as e:
        return f"{what} check failed: {type(e).__name__}: {e}"


def _always(*args: Any, **kwargs: Any) -> Reason:
    return None


_global_pins: dict[str, str] = {}
_local = threading.local()
_logged: set[tuple[str, str]] = set()


def parse_pins(spec: str, source: str = "backends") -> dict[str, str]:
    """'attention=sdpa, ssd=chunked' -> {op: backend}; every op and backend name is checked.

    `source` names where the text came from (an option, an environment variable) in the errors.
    """
    pins = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not op or not name:
            raise ValueError(f"{source} entry {item!r} must look like op=backend")
        if op not in OPS:
            raise ValueError(f"{source} entry {item!r}: unknown op {op!r}; valid ops: {', '.join(sorted(OPS))}")
        try:
            OPS[op].check_name(name)
        except BackendError as e:
            raise ValueError(f"{source} entry {item!r}: {e}") from None
        pins[op] = name
    return pins


_env_cache: tuple[str, dict[str, str]] = ("", {})


def _env_pins() -> dict[str, str]:
    """The pins of ZOO_BACKENDS, parsed once per distinct value of the variable."""
    global _env_cache
    spec = os.environ.get("ZOO_BACKENDS", "").strip()
    if spec != _env_cache[0]:
        _env_cache = (spec, parse_pins(spec, "ZOO_BACKENDS"))
    return _env_cache[1]


class Op:
    """A named op with ranked backends. Call it like a function.

    `check(*args, **kwargs)`, if given, validates every call's inputs before a backend is chosen
    (raising an error that names the argument), so a bad input gets the same message whichever
    backend is pinned or available."""

    def __init__(self, name: str, doc: str = "", check: Callable[..., None] | None = None):
        self.name = name
        self.check = check
        self.__doc__ = doc
        self.backends: dict[str, Backend] = {}
        self._ranked: list[Backend] = []
        OPS[name] = self

    def register(
        self,
        name: str,
        *,
        priority: int = 0,
        probe: Callable[[], Reason] | None = None,
        supports: Callable[..., Reason] | None = None,
        auto: Callable[..., Reason] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register `fn` as backend `name` of this op (re-registering replaces it).

        probe() -> reason or None: can this backend run here at all (called once, lazily);
        supports(*args, **kwargs) -> reason or None: can it run these inputs;
        auto(*args, **kwargs) -> reason or None: should automatic selection skip it for these inputs.
        """

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.backends[name] = Backend(self.name, name, fn, priority, probe or _always,
                                          supports or _always, auto or _always)
            self._ranked = sorted(self.backends.values(), key=lambda b: -b.priority)
            return fn

        return deco

    def unregister(self, name: str) -> None:
        """Remove backend `name` (e.g. a test's temporary backend)."""
        self.check_name(name)
        del self.backends[name]
        self._ranked = [b for b in self._ranked if b.name != name]

    def pinned(self) -> str | None:
        for scope in reversed(getattr(_local, "stack", [])):
            if self.name in scope:
                return scope[self.name]
        return _global_pins.get(self.name) or _env_pins().get(self.name)

    def reasons(self, *args: Any, **kwargs: Any) -> dict[str, Reason]:
        """Every backend, best first, with the reason it cannot run these inputs (None = can)."""
        return {b.name: b.reason(*args, **kwargs) for b in self._ranked}

    def _report(self, headline: str, args: tuple, kwargs: dict) -> str:
        lines = [f"{self.name}: {headline}. Backends (priority order):"]
        for b in self._ranked:
            lines.append(f"  - {b.name} (priority {b.priority}): {b.reason(*args, **kwargs) or 'ok'}")
        return "\n".join(lines)

    def check_name(self, name: str) -> None:
        if name != AUTO and name not in self.backends:
            valid = ", ".join([AUTO, *self.backends])
            raise BackendError(f"unknown backend {name!r} for op {self.name!r}; valid: {valid}")

    def select(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Backend:
        """The backend that would run these inputs (pins honoured)."""
        pin = backend if backend not in (None, AUTO) else self.pinned()
        if pin not in (None, AUTO):
            self.check_name(pin)
            chosen = self.backends[pin]
            why = chosen.reason(*args, **kwargs)
            if why is not None:
                raise BackendError(self._report(f"pinned backend {pin!r} cannot run ({why})", args, kwargs))
        else:
            chosen = next((b for b in self._ranked if b.auto_reason(*args, **kwargs) is None), None)
            if chosen is None:
                raise BackendError(self._report("no backend can run these inputs", args, kwargs))
        for sink in getattr(_local, "recorders", ()):
            sink.append((self.name, chosen.name))
        if (self.name, chosen.name) not in _logged:
            _logged.add((self.name, chosen.name))
            log.info("%s: using backend %r%s", self.name, chosen.name, " (pinned)" if pin else "")
        return chosen

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        if self.check is not None:
            self.check(*args, **kwargs)
        return self.select(*args, backend=backend, **kwargs).fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={list(self.backends)})"


OPS: dict[str, Op] = {}


def get_op(name: str) -> Op:
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; valid: {', '.join(sorted(OPS))}")
    return OPS[name]


def set_backend(op: str, name: str | None) -> None:
    """Pin `op` to backend `name` process-wide (`None` or "auto" unpins)."""
    get_op(op).check_name(name or AUTO)
    if name in (None, AUTO):
        _global_pins.pop(op, None)
    else:
        _global_pins[op] = name


@contextlib.contextmanager
def use_backends(**pins: str) -> Iterator[None]:
    """Pin backends inside a `with` block, e.g. `use_backends(attention="reference")`."""
    for op, name in pins.items():
        get_op(op).check_name(name)
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(pins)
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def record_choices() -> Iterator[list[tuple[str, str]]]:
    """Collect the (op, backend) pairs dispatch chooses inside a `with` block (for summaries)."""
    sink: list[tuple[str, str]] = []
    recorders = _local.__dict__.setdefault("recorders", [])
    recorders.append(sink)
    try:
        yield sink
    finally:
        recorders.remove(sink)


def module_probe(module: str, *, cuda: bool = False) -> Callable[[], Reason]:
    """An availability probe: `module` importable (lazily), and CUDA present if `cuda`."""

    def probe() -> Reason:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return f"{module} not installed"
        if cuda:
            import torch

            if not torch.cuda.is_available():
                return "needs CUDA"
        return None

    return probe
