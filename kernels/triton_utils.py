"""Shared helpers of the Triton backends: the optional import, availability, input checks, dot helper.

Triton is an optional dependency (`pip install '.[triton]'`). Without it the backend modules still
import: `jit` leaves the kernel functions as plain Python (never launched) and every backend's probe
answers "triton not installed".

Where the kernels run
  * CUDA tensors, compiled for the GPU: the normal case. The backends then rank above `reference`
    and the pure-PyTorch backends.
  * CPU tensors in Triton's interpreter, when TRITON_INTERPRET=1 was set before `import kernels`
    (the test suite does this). The interpreter is slow: automatic selection never picks a Triton
    backend for CPU tensors (`auto_check`); pin it (`backend="triton"`, `use_backends(...)`).
A CPU-only user without TRITON_INTERPRET never gets a Triton backend: the probe says "needs CUDA".
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the probes report it, nothing is launched
    triton = None
    tl = None

Reason = str | None

# Kernels are built as interpreted or compiled functions when they are decorated (at import), so the
# mode is fixed then: setting TRITON_INTERPRET later changes nothing for this process.
def _interpret_flag() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 parses the variable there
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


INTERPRET = triton is not None and _interpret_flag()

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def jit(fn: Callable[..., Any] | None = None, *, do_not_specialize: tuple[str, ...] | list[str] = ()) -> Any:
    """`triton.jit` (as `@jit` or `@jit(do_not_specialize=[...])`); the plain function when triton is not
    installed (the probe then refuses to run).

    `do_not_specialize` names integer arguments that vary from call to call (lengths, offsets, row
    starts): Triton otherwise compiles one variant per value class (== 1, divisible by 16, other)."""
    if fn is None:
        return lambda f: jit(f, do_not_specialize=do_not_specialize)
    if triton is None:
        return fn
    return triton.jit(fn, do_not_specialize=list(do_not_specialize)) if do_not_specialize else triton.jit(fn)


def autotune(configs: list[dict[str, Any]], key: list[str], interpret: dict[str, Any]) -> Callable[[Any], Any]:
    """`triton.autotune` over `configs` (dicts of meta-parameters, plus num_warps / num_stages).

    The interpreter cannot benchmark several configs: there the single config `interpret` is used
    (small blocks: the interpreter's cost grows with the block size, and test shapes are tiny).
    """
    if triton is None:
        return lambda fn: fn
    if INTERPRET:
        configs = [interpret]
    built = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                           num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2)) for c in configs]
    return triton.autotune(configs=built, key=key)


def triton_probe() -> Reason:
    """Availability: triton importable, and CUDA present or the interpreter switched on."""
    if triton is None:
        return "triton not installed (pip install '.[triton]')"
    if INTERPRET or torch.cuda.is_available():
        return None
    return "needs CUDA (or TRITON_INTERPRET=1, set before importing kernels, for the slow CPU interpreter)"


def check_tensors(*tensors: Tensor | None) -> Reason:
    """Device and dtype checks shared by the Triton backends' `supports` (None entries are skipped)."""
    given = [t for t in tensors if t is not None]
    devices = {t.device for t in given}
    if len(devices) > 1:
        return f"inputs must share one device; got {sorted(str(d) for d in devices)}"
    device = given[0].device
    if device.type == "cpu" and not INTERPRET:
        return "CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 before importing kernels"
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type} not supported (CUDA, or CPU in the interpreter)"
    floats = [t for t in given if t.is_floating_point()]
    dtype = floats[0].dtype
    if dtype == torch.float64:
        return "float64 not supported (the kernels compute in float32; use reference)"
    if dtype not in DTYPES:
        return f"{dtype} not supported (float32, bfloat16, float16)"
    if any(t.dtype != dtype for t in floats):
        return f"floating inputs must share one dtype; got {sorted({str(t.dtype) for t in floats})}"
    if device.type == "cuda" and not INTERPRET:
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8 and dtype == torch.bfloat16:
            return "bfloat16 needs a GPU of compute capability >= 8.0"
        if major < 7:
            return "needs a GPU of compute capability >= 7.0"
    return None


def auto_check(*args: Any, **kwargs: Any) -> Reason:
    """Declines automatic selection for CPU tensors (interpreter only); pinning still runs them."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if any(t.device.type == "cpu" for t in tensors):
        return "interpreter only: CPU tensors are slow in Triton's interpreter, pin backend='triton' explicitly"
    return None


def dot_dtype(dtype: torch.dtype) -> Any:
    """Operand type for `tl.dot` of inputs of `dtype`: the input type for bf16/fp16 on the GPU (tensor
    cores, float32 accumulation), float32 otherwise. The interpreter multiplies bfloat16 wrongly (it
    keeps them as raw uint16 bits), so it always gets float32."""
    if INTERPRET or dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@jit
def mma(a, b, DOT: tl.constexpr):
    """a @ b with float32 accumulation; operands cast to DOT. float32 operands use exact ("ieee")
    products: TF32 would cost 3 decimal digits, and the feedback solve amplifies errors."""
    if DOT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT), b.to(DOT))


def next_pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo) (block sizes; tl.dot needs every dimension >= 16)."""
    return max(lo, 1 << (max(1, n) - 1).bit_length())
