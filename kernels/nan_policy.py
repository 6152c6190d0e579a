"""The NaN policy of every op, whatever backend runs it: NaN in, NaN out, at the positions the op's
own dependency structure reaches, and nowhere else.

Granularity is the position: step t of row b of an input (B, T, ...) is non-finite when any of
its elements is NaN or +-inf. Each op's contract names two kinds of inputs:
  * read-out inputs reach only their own position (attention's q, ssd's C, the q of
    linear_attention and delta_rule);
  * memory inputs reach their own position and every later one that reads them: for the scans
    and the feedback solve, the rest of the segment; for attention, the queries that see the key
    (causal, window, segment). Inputs without a time axis reach all they enter: ssd's A (H,)
    every output; an initial state (B, ...) row b's first segment and row b's final state.
An output position is NaN, all of its elements, iff it is reached; a final state is NaN iff the
last step's memory reach includes it. Everything else is exactly what the op gives for finite
inputs: a NaN never crosses into an earlier step, another row or another packed document.
(Position granularity is conservative only where one element cannot matter, e.g. a decay at a
segment's first step, or feedback_solve's key k_t, which row t itself does not read.)

How (kernels.dispatch.Op runs the op's `nan_guard` around every backend, a user's included):
  1. flag: per position, one sum over its elements (NaN and +-inf propagate), no copy;
  2. clean: flagged positions are zeroed before the backend runs, so no backend can spread a NaN
     (a chunked scan's masked products turn 0 * NaN into NaN at earlier steps of a chunk; sdpa on
     CPU returns zeros for a NaN query row);
  3. mark: reached output positions are set to NaN. Reach is a cumulative count of flagged
     positions, differenced at each step's window / segment start: O(B T) index arithmetic.
On a GPU and under torch.compile: no host sync and no data-dependent shape (the graph holds it
whole), at the cost of one pass over each input for the flags, a copy of each input, and a copy of
each output when autograd records it (in place otherwise). On a CPU, outside torch.compile, asking
whether anything is flagged waits for nothing, so steps 2 and 3 are skipped when nothing is: the
cost for finite inputs is the flags' pass and O(B T) bookkeeping. A decoding cache need not be read or copied on every step: the
mixer stores its new entries cleaned, with their flags (`cache_entries`), and hands the flags to
the op (attention's `nonfinite_kv`, feedback_solve's `nonfinite_past`), which then trusts the
cached values to be finite. Measured: `python tools/bench.py nan-policy` (docs/training.md).

Gradients: a NaN output is a constant, so no gradient flows back through it, and a flagged input
position gets gradient 0. Every other input element gets exactly the gradient of the op's finite
outputs, as with finite inputs (a loss that reads a NaN output is NaN itself, and the training
loop stops on it).

The switch, for measuring the policy's cost or a backend's own handling of non-finite values (the
backends then disagree again):

    ZOO_NAN_POLICY=0 python tools/train.py ...       # for a whole process
    with nan_policy.enabled(False):                  # for a block of code
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.switch import Switch

# what an op's nan_guard returns: the cleaned (args, kwargs) for the backend, and `finish`, which
# marks the backend's result
Guarded = tuple[tuple, dict, Callable[[Any], Any]]

_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}  # flags sum half precision in float32

_switch = Switch("ZOO_NAN_POLICY", default=True)
active = _switch.active  # () -> bool: whether ops apply the NaN policy now (default on)
enabled = _switch.enabled  # (on=True): a block of code with the policy on (or, on=False, off)


def flags(*tensors: Tensor | None, batch_dims: int = 2) -> Tensor | None:
    """Non-finite positions of the given tensors (None entries skipped; None if all are): bool over
    their first `batch_dims` dims ((B, T) by default, (B,) for a state, () for a whole tensor)."""
    total = None
    for t in tensors:
        if t is None:
            continue
        # one reduction per tensor, then one test: a sum is NaN or +-inf iff an element is (finite
        # elements so large that their sum overflows, |x| > 1e35 or so in float32, count too); half
        # precision sums in float32
        dims = tuple(range(batch_dims, t.ndim))  # (an empty tuple would make sum() reduce every dim)
        part = t.sum(dims, dtype=_SUM_DTYPE.get(t.dtype)) if dims else t
        total = part if total is None else total + part
    return None if total is None else ~torch.isfinite(total)


def _nothing_flagged(flags: Tensor) -> bool:
    """True when none of `flags` is set and asking costs no device sync (a CPU tensor outside
    torch.compile); False otherwise, when the caller does its work unconditionally."""
    return flags.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(flags.any())


def clean(t: Tensor | None, bad: Tensor | None) -> Tensor | None:
    """t with the positions flagged in `bad` (t's leading dims, or a 0-d flag for all of t) set to 0
    (t itself when nothing is flagged, on a CPU)."""
    if t is None or bad is None or _nothing_flagged(bad):
        return t
    return torch.where(bad.reshape(*bad.shape, *([1] * (t.ndim - bad.ndim))), 0, t)


def mark(t: Tensor, reached: Tensor) -> Tensor:
    """t with the positions flagged in `reached` (t's leading dims) set to NaN: a backend's result, so
    in place unless autograd records it (its backward may need it as it is); t itself when nothing
    is reached, on a CPU."""
    if _nothing_flagged(reached):
        return t
    reached = reached.reshape(*reached.shape, *([1] * (t.ndim - reached.ndim)))
    if t.requires_grad:
        return torch.where(reached, float("nan"), t)
    return t.masked_fill_(reached, float("nan"))


def cache_entries(*tensors: Tensor) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """New entries (B, T, ...) of a decoding cache -> (them with their non-finite positions zeroed,
    those positions (B, T)): the cache keeps finite values and its flags, and passes the flags to the
    op (`nonfinite_kv=`, `nonfinite_past=`), which then reads neither the whole cache nor copies it.
    With the policy off: the tensors unchanged, and None."""
    if not active():
        return tensors, None
    bad = flags(*tensors)
    return tuple(clean(t, bad) for t in tensors), bad


def mark_outputs(out: Tensor | tuple[Tensor, Tensor], reached: Tensor, final: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """A scan's result, o or (o, final state): o marked at `reached` (B, T), the final state at `final` (B,)."""
    if isinstance(out, tuple):
        return mark(out[0], reached), mark(out[1], final)
    return mark(out, reached)


def run_starts(seq_idx: Tensor, S: int) -> Tensor:
    """(B, S) int64: the step where each step's run of equal segment ids begins."""
    t = torch.arange(S, device=seq_idx.device)
    new = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))
    return torch.where(new, t, 0).cummax(dim=1).values


def reach_forward(bad: Tensor, seq_idx: Tensor | None = None, window: int | None = None,
                  first_run: Tensor | None = None) -> Tensor:
    """Memory reach: bad (B, S) flagged steps -> (B, S) steps p that read a flagged step j, i.e.
    j <= p in the same run of segment ids and, with a window, p - j < window. `first_run` (B,)
    also reaches every step of each row's first run (a flagged initial state)."""
    B, S = bad.shape
    if S == 1:  # one step (decoding): it reaches itself, and it lies in its row's first run
        return bad if first_run is None else bad | first_run[:, None]
    starts = None if seq_idx is None else run_starts(seq_idx, S)
    if starts is None and window is None:
        reached = bad.cummax(dim=1).values
    else:
        t = torch.arange(S, device=bad.device)
        lo = torch.zeros_like(t).expand(B, S) if starts is None else starts
        if window is not None:
            lo = torch.maximum(lo, t - window + 1)
        count = F.pad(bad.cumsum(dim=1), (1, 0))  # count[:, p + 1]: flagged steps in [0, p]
        reached = count[:, 1:] > count.gather(1, lo)
    if first_run is not None:
        in_first = torch.ones_like(bad) if starts is None else starts == 0
        reached = reached | (first_run[:, None] & in_first)
    return reached
