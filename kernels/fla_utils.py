"""Shared helpers of the flash-linear-attention (FLA) backends of `linear_attention` and `delta_rule`.

FLA (`pip install 'flash-linear-attention>=0.6,<0.7'`, package `fla`) is an optional dependency whose
Triton kernels need a GPU. Written against FLA 0.6: its chunked entry points take (B, T, H, d)
tensors (0.6 has no head-first layout), states (N, H, dk, dv) kept in float32, and variable-length
batches as `cu_seqlens` over one flattened row (B = 1; N = number of sequences, one initial and one
final state each). Here: the probe, the checks both backends share, and the mapping of the op's
segment ids onto `cu_seqlens`.

Segments. FLA resets the state at every `cu_seqlens` boundary and wants B = 1; the op resets it where
`seq_idx` changes, in any row, and lets the initial state belong to the segment of each row's step 0.
So the rows are flattened into one sequence of B * T steps and cut at every segment start and every
row end (kernels.packing.segment_blocks: the segment lengths are read on the host, one device sync
per call); row b's initial state becomes the initial state of its first segment (the others start
from 0), and its final state is the final state of its last segment.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from kernels.packing import segment_blocks

Reason = str | None

VERSIONS = ((0, 6), (0, 7))  # [lowest, highest) release of fla-core / flash-linear-attention
PIP = "pip install 'flash-linear-attention>=0.6,<0.7'"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HALF = (torch.bfloat16, torch.float16)


def probe(module: str) -> Reason:
    """Why FLA's `module` (e.g. "fla.ops.gla") cannot run here, or None."""
    if importlib.util.find_spec("fla") is None:
        return f"flash-linear-attention not installed ({PIP}; its kernels need CUDA)"
    if not torch.cuda.is_available():
        return "needs CUDA"
    version = _installed_version()
    if version is None or not VERSIONS[0] <= version[:2] < VERSIONS[1]:
        shown = "an unknown version" if version is None else ".".join(map(str, version))
        return f"flash-linear-attention {shown} installed; this backend needs >=0.6,<0.7"
    try:
        importlib.import_module(module)
    except Exception as e:  # e.g. triton missing or too old: name it
        return f"cannot import {module}: {type(e).__name__}: {e}"
    return None


def _installed_version() -> tuple[int, ...] | None:
    for package in ("fla-core", "flash-linear-attention"):
        try:
            text = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        try:
            return tuple(int(x) for x in text.split(".")[:2])
        except ValueError:
            return None
    return None


def supports(q: Tensor, k: Tensor, v: Tensor, extra: list[Tensor | None]) -> Reason:
    """The checks both backends share: CUDA tensors, then input_reason, then the GPU's generation."""
    tensors = [t for t in (q, k, v, *extra) if t is not None]
    devices = sorted({t.device.type for t in tensors})
    if devices != ["cuda"]:
        return f"needs CUDA tensors; got {devices}"
    why = input_reason(q, v)
    if why is not None:
        return why
    major = torch.cuda.get_device_properties(q.device).major
    if major < 7 or (q.dtype == torch.bfloat16 and major < 8):
        return f"needs a GPU of compute capability >= {8 if q.dtype == torch.bfloat16 else 7}.0"
    return None


def input_reason(q: Tensor, v: Tensor) -> Reason:
    """dtype and head dims FLA's kernels take (any device)."""
    if q.dtype not in DTYPES:
        return f"{q.dtype} not supported (float32, bfloat16, float16: FLA computes in float32 at most; use chunked)"
    if q.dtype in HALF and (q.shape[-1] % 2 or v.shape[-1] % 2):
        return (f"odd head dims in {str(q.dtype).removeprefix('torch.')} not supported (FLA's backward asserts even "
                f"dk and dv in 16-bit; got dk={q.shape[-1]}, dv={v.shape[-1]})")
    return None


def auto(*args, **kwargs) -> Reason:
    """Automatic selection only: FLA's entry points are `torch.compiler.disable`d (a graph break), so
    inside torch.compile dispatch picks a backend dynamo can trace; pinned, FLA still runs."""
    if torch.compiler.is_compiling():
        return "inside torch.compile: FLA's functions are torch.compiler.disable'd (a graph break); pin to use it"
    return None


@dataclass
class Varlen:
    """The op's segments as FLA's variable-length batch (see the module docstring)."""

    cu_seqlens: Tensor  # (N + 1,) int64 on the inputs' device: segment boundaries in the flattened row
    cu_seqlens_cpu: Tensor  # the same on the host (FLA then needs no device sync of its own)
    first: Tensor  # (B,) index of each row's first segment among the N
    last: Tensor  # (B,) index of each row's last segment

    @classmethod
    def of(cls, seq_idx: Tensor) -> Varlen:
        B, T = seq_idx.shape
        lengths = segment_blocks(seq_idx, T)[0]  # every segment of every row, rows in order
        ends = torch.tensor([0, *lengths]).cumsum(0)
        # segment n ends at ends[n + 1]; the rows end at T, 2T, ...: find each row's last segment
        last = torch.searchsorted(ends, torch.arange(1, B + 1) * T) - 1
        first = torch.cat([last.new_zeros(1), last[:-1] + 1])
        return cls(ends.to(seq_idx.device), ends, first.to(seq_idx.device), last.to(seq_idx.device))

    @property
    def n(self) -> int:
        return len(self.cu_seqlens_cpu) - 1

    @staticmethod
    def flatten(t: Tensor) -> Tensor:
        """(B, T, ...) -> (1, B * T, ...): the rows as one sequence."""
        return rearrange(t, "b t ... -> 1 (b t) ...")

    def initial_states(self, h0: Tensor | None) -> Tensor | None:
        """(B, H, dk, dv) -> (N, H, dk, dv): row b's state for its first segment, zeros for the others."""
        if h0 is None:
            return None
        return h0.new_zeros(self.n, *h0.shape[1:]).index_copy(0, self.first, h0)

    def final_states(self, ht: Tensor) -> Tensor:
        """(N, H, dk, dv) -> (B, H, dk, dv): each row's last segment."""
        return ht.index_select(0, self.last)
