"""Tolerances, as data: how far a backend may be from `reference` (tests/test_conformance.py), and a few
other comparisons of a computation with its float64 or float32 truth.

An error is measured relative to the size of the result: |got - want| / max(1, max |want|) per output
and per gradient (the feedback solve amplifies by up to 1 / (1 - gamma_max), so absolute errors grow
with the output). A CPU tolerance bounds exactly that number (atol on the normalised tensors, rtol 0).

How they are set. `python -m tests.measure_errors` runs every conformance case (forward and every
gradient; float64, float32, bfloat16; with 1 and 2 torch threads) and writes the largest error per
device, op, backend and dtype, with the case that gave it and where it ran, to tests/measured_errors.json.
Each CPU tolerance is 10x that, rounded up to one significant digit, with two exceptions:
  - bfloat16 never goes below 1e-2: where both sides compute in float32 and round once, they agree to
    float32 noise here, but any rounding that flips on another CPU moves an element by one bfloat16
    step, up to 2^-7 = 7.8e-3 of the largest value;
  - where 10x would loosen an older, tighter bfloat16 tolerance that is still 3x the measurement, the
    older one stays (attention and the Triton SSD in bfloat16, whose errors are about one rounding step).
tests/test_tolerances.py fails when a tolerance is under 3x its measurement or over 30x (where 30x is
below two rounding steps of the dtype, two steps are allowed), and when a backend the suite runs here
has no measurement. After changing a backend, rerun the command, commit the json, and
adjust the number here if that test asks.

Triton backends run in the CPU interpreter here, with float32 products whatever the input dtype: their
CPU numbers say nothing about bfloat16/float16 on a GPU's tensor cores. The CUDA tolerances (`make
test-gpu`) and the CUDA-only backends (flash_attn, xformers, mamba_ssm, fla) are not measured here (needs
CUDA): they keep tolerances from the rounding analysis below until `python -m tests.measure_errors
--device cuda` is run on a GPU.
"""

import torch

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# CPU: op -> backend -> dtype -> largest allowed normalised error (measured: tests/measured_errors.json)
CPU = {
    "attention": {"sdpa": {F64: 2e-14, F32: 1e-5, BF16: 3e-2},
                  "triton": {F32: 9e-6, BF16: 3e-2}},  # Triton interpreter
    "feedback_solve": {"chunked": {F64: 1e-14, F32: 6e-6, BF16: 1e-2},
                       "triton": {F32: 6e-6, BF16: 1e-2}},  # Triton interpreter
    "ssd": {"chunked": {F64: 2e-14, F32: 3e-6, BF16: 1e-2},
            "triton": {F32: 2e-5, BF16: 3e-2}},  # Triton interpreter
    "linear_attention": {"chunked": {F64: 2e-14, F32: 4e-6, BF16: 1e-2}},
    "delta_rule": {"chunked": {F64: 8e-15, F32: 4e-6, BF16: 1e-2}},
}

# CUDA (not measured here: needs CUDA). Compared as atol = rtol on the normalised tensors. float32 on a
# GPU may differ from the CPU in summation order and in library kernels' precision; bfloat16 and float16
# carry 2^-8 and 2^-11 relative rounding per stored value, with Triton's tensor-core products in the
# input dtype (float32 accumulation): a few rounding steps of the largest value.
CUDA = {F32: dict(atol=2e-4, rtol=2e-4), BF16: dict(atol=3e-2, rtol=3e-2), F16: dict(atol=5e-3, rtol=5e-3)}
CUDA_OVERRIDES = {
    # the feedback solve amplifies float32 rounding by up to 1 / (1 - gamma_max)
    ("feedback_solve", None, F32): dict(atol=5e-4, rtol=5e-4),
    **{(op, None, dtype): tol for op in ("linear_attention", "delta_rule")
       for dtype, tol in {F32: dict(atol=4e-6, rtol=4e-6), BF16: dict(atol=1e-2, rtol=1e-2)}.items()},
    # FLA's Triton kernels (the `fla` backends) multiply float32 operands in TF32, Triton's default on NVIDIA
    # GPUs (float16's 10-bit mantissa), and keep some chunk states in the inputs' dtype: float32 is held to
    # float16-like precision, bfloat16 to the general bfloat16 tolerance. In Triton's CPU interpreter (exact
    # float32 products) they measured up to 2.5e-6 (float32) and 9.4e-4 (float16) on kernels.validation's
    # cases (`python -m tests.fla_interpreter --validation-cases`).
    **{(op, "fla", F32): dict(atol=1e-2, rtol=1e-2) for op in ("linear_attention", "delta_rule")},
    **{(op, "fla", BF16): CUDA[BF16] for op in ("linear_attention", "delta_rule")},
}


def tolerance(op: str, dtype: torch.dtype, backend: str, device: str = "cpu") -> dict:
    """assert_close keywords for `backend` against `reference` on normalised tensors."""
    if device == "cpu":
        if dtype not in CPU.get(op, {}).get(backend, {}):
            raise KeyError(f"no CPU tolerance for {op}/{backend}/{dtype}: run `python -m tests.measure_errors {op}` "
                           "and add about 10x its largest error to tests/tolerances.py")
        return dict(atol=CPU[op][backend][dtype], rtol=0.0)
    return CUDA_OVERRIDES.get((op, backend, dtype)) or CUDA_OVERRIDES.get((op, None, dtype)) or CUDA[dtype]


# Comparisons outside the conformance suite, keyed by the test that makes them (measured by the same
# command, tests/measured_errors.json "checks"; same normalisation, same 10x rule).
CHECKS = {
    # chunked SSD in float32 / bfloat16 from rounded float64 inputs against the float64 reference, 300 steps
    # of strong decay with segments (tests/test_ssd.py): input rounding included
    "ssd.long_sequence": {F32: 7e-7, BF16: 8e-2},
    # chunked feedback solve on bfloat16 inputs against the float32 reference of the same inputs: the
    # output's own rounding, at most 2^-8 of the largest value (tests/test_feedback_chunked.py)
    "feedback_solve.half_precision": {BF16: 2e-2},
}

# Converted checkpoints (tests/test_interop_*.py): zoo logits against the upstream model's (float32:
# measured up to 7.6e-6 on logits up to 27 against Hugging Face's, tools/interop_parity.py) and
# against the independent float64 model in zoo/interop/mamba2_reference.py (float64: measured up to 1.3e-13).
INTEROP = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
}
# A float32 zoo model against the float64 truth: max |difference| / max |logit| (measured up to 9e-6).
INTEROP_FLOAT32_OF_MAX = 1e-4
