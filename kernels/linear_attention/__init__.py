"""Op `linear_attention`: gated linear attention with a (dk x dv) state per head.

`contract.py` holds the op itself (its contract in the docstring) and the input checks every
backend shares; each other module is one backend and imports only the contract. Importing this
package registers all of them: reference, chunked, fla.
"""

from kernels.linear_attention.contract import check_inputs, linear_attention
from kernels.linear_attention import reference, chunked, fla  # noqa: F401  (each registers its backend)

__all__ = ["check_inputs", "linear_attention"]
