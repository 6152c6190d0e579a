"""Full float32 math inside a backend, whatever autocast and the matmul-precision switches say.

The feedback solve amplifies errors by up to 1 / (1 - gamma_max) (1000 at gamma = 0.999), so its
backends compute in float32 even when the caller runs under autocast (which would multiply in
bfloat16) or has allowed reduced-precision float32 products: TF32 on NVIDIA GPUs
(`torch.set_float32_matmul_precision("high")`, `torch.backends.cuda.matmul.allow_tf32`) or bfloat16
inside oneDNN's CPU matmuls (`"medium"`). `exact_float32(device)` switches all of that off for its
block and restores the caller's settings through the API they were made with (torch refuses reads
that mix its old and new APIs).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch


def exact_float32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on `device`'s type and IEEE float32 matmul products (CUDA's TF32 and oneDNN's
    bfloat16 off), inside the block. Inside torch.compile only autocast is switched off: the
    precision switches are process-wide settings a traced graph cannot change (set them yourself)."""
    if torch.compiler.is_compiling():
        return torch.autocast(device.type, enabled=False)
    return _exact_float32_eager(device)


@contextlib.contextmanager
def _exact_float32_eager(device: torch.device) -> Iterator[None]:
    cuda = torch.backends.cuda.matmul
    try:
        saved_cuda, attr, exact = cuda.allow_tf32, "allow_tf32", False
    except RuntimeError:  # the caller used the newer fp32_precision API
        saved_cuda, attr, exact = cuda.fp32_precision, "fp32_precision", "ieee"
    cpu = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)  # oneDNN's float32 matmuls
    saved_cpu = None if cpu is None else cpu.fp32_precision
    setattr(cuda, attr, exact)
    if cpu is not None:
        cpu.fp32_precision = "ieee"
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        setattr(cuda, attr, saved_cuda)
        if cpu is not None:
            cpu.fp32_precision = saved_cpu


def exact_float32_backward(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for an autograd.Function's backward(ctx, *grads): run it under exact_float32 (autograd
    may call it inside the caller's autocast region, or with TF32 switched on since the forward)."""
    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        device = next(g.device for g in grads if isinstance(g, torch.Tensor))
        with exact_float32(device):
            return backward(ctx, *grads)
    return wrapper


def without_autocast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for a backend whose contract computes in float32 (half-precision inputs included):
    autocast off on its inputs' device while it runs, so autocast's bfloat16 matmuls do not replace
    the float32 ones. The float32-matmul precision switches (TF32) are left as the caller set them."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper
