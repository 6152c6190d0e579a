"""Compute ops behind the mixers: one package per op, one module per backend (see dispatch).

    from kernels.attention import attention            # the op: call it like a function
    from kernels.feedback_solve import feedback_solve
    from kernels.ssd import ssd
    from kernels.linear_attention import linear_attention
    from kernels.delta_rule import delta_rule

Importing `kernels` registers every built-in backend; backends whose dependencies are missing
register anyway and report themselves unavailable with a reason. `kernels.validate()` checks the
backends that must earn trust on this device (kernels.validation).
"""

import kernels.attention
import kernels.delta_rule
import kernels.feedback_solve
import kernels.linear_attention
import kernels.ssd
from kernels.dispatch import (AUTO, OPS, Backend, BackendError, Op, UnvalidatedBackendWarning, get_op, record_choices,
                              set_backend, use_backends)
from kernels.validation import validate

__all__ = ["OPS", "AUTO", "Backend", "BackendError", "Op", "UnvalidatedBackendWarning", "get_op", "record_choices",
           "set_backend", "use_backends", "validate"]
