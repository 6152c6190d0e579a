"""Op `ssd`: Mamba-2"s selective state-space scan.

`contract.py` holds the op itself (its contract in the docstring), the input checks and the masks
every backend shares; each other module is one backend and imports only the contract. Importing
this package registers all of them: reference, chunked, mamba_ssm, triton.
"""

from kernels.ssd.contract import check_inputs, segment_starts, ssd
from kernels.ssd import reference, chunked, mamba_ssm, triton  # noqa: F401  (each registers its backend)

__all__ = ["check_inputs", "segment_starts", "ssd"]
