"""Op `delta_rule`: the (gated) delta rule with a (dk x dv) state per head.

`contract.py` holds the op itself (its contract in the docstring) and the input checks every
backend shares; each other module is one backend and imports only the contract. Importing this
package registers all of them: reference, chunked, fla.
"""

from kernels.delta_rule.contract import check_inputs, delta_rule
from kernels.delta_rule import reference, chunked, fla  # noqa: F401  (each registers its backend)

__all__ = ["check_inputs", "delta_rule"]
