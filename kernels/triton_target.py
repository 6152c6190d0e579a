"""Compile this package's Triton kernels for a GPU target on any machine, no GPU needed.

Triton compiles for a `GPUTarget` without a device (its bundled ptxas does the last step), so the
numbers that decide whether a kernel can run and how long its first call takes are available on a
laptop: shared memory per program, registers, spills and compile time.

    from kernels.triton_target import SM90, compile_kernel, virtual_gpu
    report = compile_kernel(kernel, args, kwargs, num_warps=4, num_stages=2)   # one kernel, one config
    with virtual_gpu() as launches:           # every launch inside compiles for SM90 instead of running
        backend_fn(*cpu_tensors)
    launches.compiled                         # one Report per distinct compilation a GPU would do

Kernels must have been built without TRITON_INTERPRET (interpreted kernels have nothing to compile).
Inside `virtual_gpu` tensors stay on the CPU: launches are recorded and compiled, never run, so
outputs hold garbage; call backend functions directly (dispatch would decline CPU tensors). Use it
in a process of its own: the stand-in kernels it leaves in Triton's per-kernel caches never run.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from kernels.triton_utils import triton

SHARED_LIMIT = {90: 232448, 89: 101376, 80: 166912}  # bytes of shared memory one program may use (opt-in maximum)


def _target(capability: int = 90, warp_size: int = 32):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", capability, warp_size)


@dataclass
class Report:
    """What compiling one kernel variant for the target produced."""

    kernel: str
    config: str
    shared: int  # bytes of shared memory per program
    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    seconds: float  # compile time on this machine
    error: str | None = None  # e.g. out of shared memory

    def fits(self, capability: int = 90) -> bool:
        return self.error is None and self.shared <= SHARED_LIMIT.get(capability, SHARED_LIMIT[80])

    def row(self) -> str:
        if self.error:
            return f"{self.kernel:<24} {self.config:<40} error: {self.error}"
        return (f"{self.kernel:<24} {self.config:<40} shared {self.shared / 1024:6.1f} KiB  regs {self.registers:>3}  "
                f"spills {self.spill_stores:>6}/{self.spill_loads:<6} B  {self.seconds:6.1f} s")


def _jit_function(kernel: Any) -> Any:
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise TypeError(f"{kernel!r} is not a compiled Triton kernel (built under TRITON_INTERPRET=1?)")
        fn = fn.fn
    return fn


_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _compile(fn: Any, signature: dict, constexprs: dict, attrs: dict, options: Any, target: Any,
             config: str) -> Report:
    """triton.compile with ptxas' verbose log captured: -> Report."""
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.errors import OutOfResources

    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    start = time.perf_counter()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except OutOfResources as e:
        return Report(fn.__name__, config, 0, 0, 0, 0, time.perf_counter() - start, error=str(e))
    finally:
        knobs.nvidia.dump_ptxas_log = old
    seconds = time.perf_counter() - start
    text = log.getvalue()
    spills = _PTXAS.search(text)
    regs = _REGS.search(text)
    return Report(fn.__name__, config, compiled.metadata.shared, int(regs[1]) if regs else -1,
                  int(spills[1]) if spills else -1, int(spills[2]) if spills else -1, seconds)


def _config_text(kwargs: dict, constexpr_names: list[str]) -> str:
    keep = {k: v for k, v in kwargs.items() if k in constexpr_names or k in ("num_warps", "num_stages")}
    return " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in keep.items() if not k.startswith("HAS_"))


def compile_kernel(kernel: Any, args: tuple, kwargs: dict, *, num_warps: int = 4, num_stages: int = 2,
                   capability: int = 90) -> Report:
    """Compile `kernel` (a @jit or @autotune kernel) for sm_<capability> as a launch with these
    arguments would (tensors only give dtypes and alignment: CPU tensors are fine) -> Report."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(kernel)
    target = _target(capability)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(kwargs, num_warps=num_warps, num_stages=num_stages)
    bound, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    names = [p.name for p in fn.params if p.is_constexpr]
    return _compile(fn, signature, constexprs, attrs, options, target, _config_text(kw, names))


@dataclass
class Launches:
    """What `virtual_gpu` saw: one Report per distinct (kernel, specialisation, config) compiled."""

    compiled: list[Report] = field(default_factory=list)
    launches: int = 0

    def by_kernel(self) -> dict[str, list[Report]]:
        out: dict[str, list[Report]] = {}
        for r in self.compiled:
            out.setdefault(r.kernel, []).append(r)
        return out


class _FakeDriver:
    """Just enough of Triton's driver for JITFunction.run to bind and compile for `target`."""

    def __init__(self, target: Any):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _NotLaunched:
    """Stands in for a compiled kernel: launching it does nothing."""

    function = packed_metadata = None

    def __init__(self, report: Report):
        self.report = report

    def launch_metadata(self, *args, **kwargs):
        return None

    def run(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def virtual_gpu(capability: int = 90, compile: bool = True) -> Iterator[Launches]:
    """Inside: every Triton launch compiles for sm_<capability> (once per distinct variant, as a GPU
    would on a cold cache) and is recorded instead of run; autotuners compile every config they
    would benchmark and keep the first. `compile=False` only counts the variants."""
    from triton.runtime import autotuner, jit
    from triton.runtime.driver import driver

    seen = Launches()
    target = _target(capability)

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel_cache = self.device_caches[device][0]
        named = {self.arg_names[path[0]]: value for path, value in constexprs.items()}
        config = _config_text(dict(named, num_warps=options.num_warps, num_stages=options.num_stages), list(named))
        if compile:
            report = _compile(self, signature, constexprs, attrs, options, target, config)
        else:
            report = Report(self.__name__, config, 0, 0, 0, 0, 0.0)
        seen.compiled.append(report)
        kernel = _NotLaunched(report)
        kernel_cache[key] = kernel
        return kernel

    def run(self, *args, grid, warmup, **kwargs):
        seen.launches += not warmup
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def bench(self):
        return lambda kernel_call, quantiles: (kernel_call(), [1.0, 1.0, 1.0])[1]

    original_run = jit.JITFunction.run
    saved = (jit.JITFunction._do_compile, jit.JITFunction.run, autotuner.Autotuner.do_bench, driver._active)
    jit.JITFunction._do_compile = do_compile
    jit.JITFunction.run = run
    autotuner.Autotuner.do_bench = property(bench)
    driver.set_active(_FakeDriver(target))
    try:
        yield seen
    finally:
        jit.JITFunction._do_compile, jit.JITFunction.run, autotuner.Autotuner.do_bench, driver._active = saved
