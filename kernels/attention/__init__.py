"""Op `attention`: causal softmax attention with grouped-query heads.

`contract.py` holds the op itself (its contract in the docstring), the input checks and the masks
every backend shares; each other module is one backend and imports only the contract. Importing
this package registers all of them: reference, sdpa, xformers, flash_attn, triton.
"""

from kernels.attention.contract import attention, check_inputs, visible
from kernels.attention import reference, sdpa, xformers, flash_attn, triton  # noqa: F401  (each registers its backend)

__all__ = ["attention", "check_inputs", "visible"]
