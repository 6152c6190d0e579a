"""Compute ops behind the mixers, one module per op, each with ranked backends (see dispatch)."""

from kernels.dispatch import OPS, AUTO, Backend, BackendError, Op, get_op, set_backend, use_backends
from kernels.attention import attention
from kernels.feedback_solve import feedback_solve
from kernels.ssd import ssd

__all__ = ["OPS", "AUTO", "Backend", "BackendError", "Op", "get_op", "set_backend", "use_backends",
           "attention", "feedback_solve", "ssd"]
