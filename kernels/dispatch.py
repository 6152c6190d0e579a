"""Backend dispatch: one `Op` per mathematical function, several ranked backends per op.

A backend declares a name, a priority, a lazy availability `probe()` and a `supports(*args, **kwargs)`
check; both return `None` when fine or a short reason string ("needs CUDA", "float64 not
supported"). Dispatch picks the highest-priority backend that is available and supports the
inputs, and logs the choice once per (op, backend). An optional `auto(*args, **kwargs)` check declines
only automatic selection (a pinned backend still runs), e.g. Triton's slow CPU interpreter.
An exception raised by a probe or a check becomes that backend's reason; it never escapes dispatch.

Trust is per device. A backend registered with `needs_validation=True` (this project's own GPU
kernels) is skipped by automatic selection on a device until `kernels.validate()` has checked it
there against `reference` with the same torch / Triton versions (kernels.validation keeps the
results in a user cache file); pinning runs it anyway, with a one-time warning.

Under torch.compile the choice is made while tracing and leaves nothing in the graph; its one-time
log line (and warning) is emitted at trace time.

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
import importlib.metadata
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger("kernels")

Reason = str | None
AUTO = "auto"


class BackendError(RuntimeError):
    """No backend can run these inputs, or a pinned backend cannot."""


class UnvalidatedBackendWarning(UserWarning):
    """A pinned backend runs on a device where kernels.validate() has not checked it."""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


# what a validation result holds for: a device under these versions (read once, at import)
VERSIONS = f"torch {torch.__version__}, triton {_version('triton')}, CUDA {torch.version.cuda or 'none'}"
# (device key, op, backend) validated on that device with VERSIONS; filled by kernels.validation
VALIDATED: set[tuple[str, str, str]] = set()


def device_key(device: torch.device) -> str:
    """The name validation results are stored under: the device's name and the versions in use."""
    name = torch.cuda.get_device_properties(device).name if device.type == "cuda" else device.type
    return f"{name} ({VERSIONS})"


def _device_of(args: tuple, kwargs: dict) -> torch.device | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None


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
    needs_validation: bool = False
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
        return _unavailable(self.op, self.name) or _checked("supports", self.supports, args, kwargs)

    def auto_reason(self, *args: Any, **kwargs: Any) -> Reason:
        """Why automatic selection skips this backend for these inputs (pinned, it may still run)."""
        return (self.reason(*args, **kwargs) or _checked("auto", self.auto, args, kwargs)
                or self.validation_reason(_device_of(args, kwargs)))

    def validation_reason(self, device: torch.device | None) -> Reason:
        """Why this backend is not trusted on `device` yet (None: trusted, or needs no validation)."""
        if not self.needs_validation or device is None:
            return None
        key = device_key(device)
        if (key, self.op, self.name) in VALIDATED:
            return None
        return f"not validated on {key}: run `python tools/validate.py` (pin to use it anyway)"


@torch.compiler.assume_constant_result
def _unavailable(op: str, backend: str) -> Reason:
    """OPS[op].backends[backend].unavailable_reason(): dynamo calls it while tracing and keeps the
    answer as a constant, so probing on the first compiled call adds no guard (and no recompile)."""
    return OPS[op].backends[backend].unavailable_reason()


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
_warned: set[tuple[str, str, str]] = set()


def parse_pins(spec: str, source: str = "backends") -> dict[str, str]:
    """'attention=sdpa, ssd=chunked' -> {op: backend}; every op and backend name is checked.

    `source` names where the text came from (an option, an environment variable) in the errors.
    """
    pins = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not op or not name:
            raise ValueError(f"{source} entry {item!r} must look like op=backend")
        check_pin(op, name, f"{source} entry {item!r}")
        pins[op] = name
    return pins


def check_pin(op: str, name: str, where: str) -> None:
    """Raise ValueError (prefixed by `where`) unless `op` is a registered op and `name` one of its
    backends (or "auto"); the message lists the valid names."""
    if op not in OPS:
        raise ValueError(f"{where}: unknown op {op!r}; valid ops: {', '.join(sorted(OPS))}")
    try:
        OPS[op].check_name(name)
    except BackendError as e:
        raise ValueError(f"{where}: {e}") from None


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
        needs_validation: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register `fn` as backend `name` of this op (re-registering replaces it).

        probe() -> reason or None: can this backend run here at all (called once, lazily);
        supports(*args, **kwargs) -> reason or None: can it run these inputs;
        auto(*args, **kwargs) -> reason or None: should automatic selection skip it for these inputs;
        needs_validation: automatic selection waits for kernels.validate() on each device.
        """

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.backends[name] = Backend(self.name, name, fn, priority, probe or _always,
                                          supports or _always, auto or _always, needs_validation)
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
        untrusted = None
        if pin not in (None, AUTO):
            self.check_name(pin)
            chosen = self.backends[pin]
            why = chosen.reason(*args, **kwargs)
            if why is not None:
                raise BackendError(self._report(f"pinned backend {pin!r} cannot run ({why})", args, kwargs))
            untrusted = chosen.validation_reason(_device_of(args, kwargs))
        else:
            chosen = next((b for b in self._ranked if b.auto_reason(*args, **kwargs) is None), None)
            if chosen is None:
                raise BackendError(self._report("no backend can run these inputs", args, kwargs))
        _announce(self.name, chosen.name, pin not in (None, AUTO), untrusted)
        return chosen

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        if self.check is not None:
            self.check(*args, **kwargs)
        return self.select(*args, backend=backend, **kwargs).fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={list(self.backends)})"


OPS: dict[str, Op] = {}


def _announce(op: str, backend: str, pinned: bool, untrusted: Reason) -> None:
    """The side effects of a choice: record_choices sinks, the one-time log line, the one-time warning
    for an unvalidated pinned backend. Under torch.compile they run once, while tracing, via dynamo's
    comptime hook, so the traced graph holds only the chosen backend's computation."""
    if torch.compiler.is_compiling():
        if _comptime is not None:
            _comptime(_announce_at_trace)
    else:
        _effects(op, backend, pinned, untrusted)


def _effects(op: str, backend: str, pinned: bool, untrusted: Reason) -> None:
    for sink in getattr(_local, "recorders", ()):
        sink.append((op, backend))
    if (op, backend) not in _logged:
        _logged.add((op, backend))
        log.info("%s: using backend %r%s", op, backend, " (pinned)" if pinned else "")
    if untrusted is not None and (op, backend, untrusted) not in _warned:
        _warned.add((op, backend, untrusted))
        warnings.warn(f"{op}: pinned backend {backend!r} is {untrusted}", UnvalidatedBackendWarning, stacklevel=5)


def _announce_at_trace(ctx: Any) -> None:
    """comptime callback: read _announce's arguments from the frame being traced, apply them now."""
    _effects(*(ctx.get_local(name).as_python_constant() for name in ("op", "backend", "pinned", "untrusted")))


try:  # dynamo's hook for code that runs at trace time (private; without it compiled runs just stay quiet)
    from torch._dynamo.comptime import comptime as _comptime
except ImportError:
    _comptime = None


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


def module_probe(module: str, *, cuda: bool = False, requirement: str | None = None) -> Callable[[], Reason]:
    """An availability probe: `module` importable (lazily), CUDA present if `cuda`, and, given its pip
    `requirement` ("flash-attn>=2.3,<3": a minimum major.minor and a major bound), its __version__ in range."""
    if requirement is not None:
        parsed = re.fullmatch(r"([\w.-]+)>=(\d+)\.(\d+),<(\d+)", requirement)
        if parsed is None:
            raise ValueError(f"requirement {requirement!r} must look like 'package>=2.3,<3'")
        package, bounds = parsed[1], requirement[len(parsed[1]):]
        lo, hi = (int(parsed[2]), int(parsed[3])), (int(parsed[4]), 0)

    def probe() -> Reason:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            hint = f" (pip install '{requirement}'{': CUDA builds only' if cuda else ''})" if requirement else ""
            return f"{module} not installed{hint}"
        if cuda and not torch.cuda.is_available():
            return "needs CUDA"
        if requirement is not None:
            installed = importlib.import_module(module).__version__
            if not lo <= tuple(int(x) for x in installed.split(".")[:2]) < hi:
                return f"{package} {installed} installed; this backend needs {bounds}"
        return None

    return probe
