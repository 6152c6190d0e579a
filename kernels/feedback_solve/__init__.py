"""Op `feedback_solve`: Sessa"s feedback solve (I - B_fb) s = f.

`contract.py` holds the op itself (its contract in the docstring), the input checks and the masks
every backend shares; each other module is one backend and imports only the contract. Importing
this package registers all of them: reference, chunked, triton.
"""

from kernels.feedback_solve.contract import check_inputs, feedback_solve, routing_weights, strict_past
from kernels.feedback_solve import reference, chunked, triton  # noqa: F401  (each registers its backend)

__all__ = ["check_inputs", "feedback_solve", "routing_weights", "strict_past"]
