"""Input checks the op contracts share; every error names the op and the argument.

    check_tensors("ssd", dict(x=x, dt=dt, ...))      floating-point torch.Tensors on one device
    check_segments("ssd", seq_idx, (B, T), "(batch, T)", x.device)
    check_values("ssd", "A", A, A > 0, "be <= 0 (a decay)", "max A = {max:.6g}")   # with value checks on
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.packing import check_seq_idx


def check_tensors(op: str, tensors: dict[str, Tensor | None]) -> None:
    """Every given tensor (None: absent) is a floating-point torch.Tensor on the device of the first."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor; got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")


def check_segments(op: str, seq_idx: Tensor | None, shape: tuple[int, ...], dims: str, device) -> None:
    """seq_idx is None or integer segment ids of `shape` (described as `dims`) on `device`. Whether
    the segments are contiguous reads the values: the contracts check it with value checks on."""
    if seq_idx is None:
        return
    check_seq_idx(seq_idx, shape, dims, contiguous=False)
    if seq_idx.device != device:
        raise ValueError(f"{op}: seq_idx is on {seq_idx.device} but the other inputs are on {device}")


def check_flags(op: str, name: str, flags: Tensor | None, shape: tuple[int, ...], dims: str, device) -> None:
    """flags is None or a bool tensor of `shape` (described as `dims`) on `device` (a NaN-policy hint)."""
    if flags is None:
        return
    if not isinstance(flags, Tensor) or flags.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a bool torch.Tensor {dims}; got "
                        f"{flags.dtype if isinstance(flags, Tensor) else type(flags).__name__}")
    if tuple(flags.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must be {dims} = {tuple(shape)}; got {tuple(flags.shape)}")
    if flags.device != device:
        raise ValueError(f"{op}: {name} is on {flags.device} but the other inputs are on {device}")


def check_values(op: str, name: str, values: Tensor | None, violated: Tensor | None, rule: str, got: str,
                 why: str = "") -> None:
    """A value check (run with kernels.value_checks on): raise ValueError `{op}: {name} must {rule}; got
    {got}{why}` if any element of `values` is `violated` (a bool tensor like it); `got` may use {min}
    and {max}, the range of the offending values. Write `violated` so that NaN never violates (`g > 0`,
    not `~(g <= 0)`): non-finite values follow the NaN policy (kernels.nan_policy), not these checks."""
    if values is None or not values.numel() or not bool(violated.any()):
        return
    bad = values[violated]
    raise ValueError(f"{op}: {name} must {rule}; got {got.format(min=bad.min().item(), max=bad.max().item())}{why}")
