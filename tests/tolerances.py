"""Tolerances for comparing a backend with the `reference` backend, as data.

Keyed by dtype; an op may override a dtype with OP_OVERRIDES[(op, dtype)]. Forward and gradients
share a dtype's tolerance; gradients of half-precision inputs are compared after scaling by the
largest reference magnitude (see tests/test_conformance.py).
"""

import torch

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}

# Largest error of `chunked` against `reference` over the cases, `python -m tests.measure_errors
# linear_attention delta_rule` (forward / gradients, relative to max(1, max |reference|)):
#   linear_attention  float64 3.7e-16 / 1.2e-15   float32 2.0e-07 / 3.7e-07   bfloat16 0 / 6.6e-04
#   delta_rule        float64 3.7e-16 / 8.0e-16   float32 1.8e-07 / 3.8e-07   bfloat16 0 / 2.9e-05
# Tolerances are about 10x these; bfloat16 cannot go below its rounding step (2^-8 = 3.9e-3 relative).
_STATE_OPS = {
    torch.float64: dict(atol=2e-14, rtol=2e-14),
    torch.float32: dict(atol=4e-6, rtol=4e-6),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}

# The feedback solve amplifies by up to 1 / (1 - gamma_max): compare in relative-to-max terms.
OP_OVERRIDES = {
    ("feedback_solve", torch.float32): dict(atol=5e-4, rtol=5e-4),
    **{(op, dtype): tol for op in ("linear_attention", "delta_rule") for dtype, tol in _STATE_OPS.items()},
}

# FLA's Triton kernels (the `fla` backends, CUDA only) multiply float32 operands in TF32, Triton's
# default on NVIDIA GPUs (float16's 10-bit mantissa), and keep some chunk states in the inputs' dtype:
# float32 is held to float16-like precision, bfloat16 to the general bfloat16 tolerance. In Triton's
# CPU interpreter (exact float32 products) they measured up to 2.5e-6 (float32) and 9.4e-4 (float16)
# on kernels.validation's cases (`python -m tests.fla_interpreter --validation-cases`); not yet on a GPU.
BACKEND_OVERRIDES = {
    **{(op, "fla", torch.float32): dict(atol=1e-2, rtol=1e-2) for op in ("linear_attention", "delta_rule")},
    **{(op, "fla", torch.bfloat16): TOLERANCES[torch.bfloat16] for op in ("linear_attention", "delta_rule")},
}


def tolerance(op: str, dtype: torch.dtype, backend: str | None = None) -> dict:
    return BACKEND_OVERRIDES.get((op, backend, dtype)) or OP_OVERRIDES.get((op, dtype), TOLERANCES[dtype])

# Converted checkpoints (tests/test_interop_*.py): zoo logits against the upstream model's (float32:
# measured up to 7.6e-6 on logits up to 27 against Hugging Face's, tools/interop_parity.py) and
# against the independent float64 model in tests/upstream_mamba2.py (float64: measured up to 1.3e-13).
INTEROP = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
}
# A float32 zoo model against the float64 truth: max |difference| / max |logit| (measured up to 9e-6).
INTEROP_FLOAT32_OF_MAX = 1e-4
