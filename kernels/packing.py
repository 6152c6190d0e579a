"""Packed sequences and left padding, expressed as segment ids.

Every op takes an optional `seq_idx`: an integer tensor (B, S) naming the segment (document) of
each time step. Two positions interact only when their segment ids are equal. This covers:
  * packing: `cu_seqlens` -> ids 0, 0, 0, 1, 1, 2, ... along one row (B = 1);
  * left padding: pads get id -1, the prompt id 0, so the prompt never sees the pads.
Segments must be contiguous in time: an id may not reappear in a row after another id
(`check_seq_idx` raises, naming the row and the id). `None` means one segment per row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    """cu_seqlens (N+1,) int, starting at 0 -> seq_idx (1, total) int64."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D integer torch.Tensor, e.g. torch.tensor([0, 5, 9]); "
                        f"got {type(cu_seqlens).__name__}")
    if not _is_integer(cu_seqlens):
        raise TypeError(f"cu_seqlens must hold integer offsets (torch.int32 or torch.int64); got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and have >= 2 entries; got {cu_seqlens.tolist()}")
    lengths = cu_seqlens.diff()
    if (lengths <= 0).any():
        raise ValueError(f"cu_seqlens must be strictly increasing; got {cu_seqlens.tolist()}")
    total = int(cu_seqlens[-1]) if total is None else total
    if int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the sequence has {total} tokens")
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    return ids[None].long()


def _is_integer(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def check_seq_idx(seq_idx: Tensor, shape: tuple[int, ...], dims: str = "(B, T)", name: str = "seq_idx", *,
                  contiguous: bool = True) -> None:
    """seq_idx must be an integer tensor of `shape` (described as `dims`) whose segments are
    contiguous in time (each id in one run per row; `contiguous=False` skips that check, which
    reads the values). Errors name `name`."""
    if not isinstance(seq_idx, Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of segment ids; got {type(seq_idx).__name__}")
    if not _is_integer(seq_idx):
        raise TypeError(f"{name} must hold integer segment ids (e.g. torch.long); got {seq_idx.dtype}")
    if tuple(seq_idx.shape) != tuple(shape):
        raise ValueError(f"{name} must be {dims} = {tuple(shape)}; got {tuple(seq_idx.shape)}")
    if contiguous:
        check_contiguous(seq_idx, name)


def check_contiguous(seq_idx: Tensor, name: str = "seq_idx") -> None:
    """Raise ValueError if a segment id of (B, T) `seq_idx` reappears in a row after another id.

    A row is contiguous iff it has as many runs of equal ids as distinct ids (one sort, one sync)."""
    if seq_idx.ndim != 2 or seq_idx.shape[1] < 3:
        return
    runs = (seq_idx[:, 1:] != seq_idx[:, :-1]).sum(1)
    ordered = seq_idx.sort(dim=1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(1)
    bad = (runs != distinct).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        ids, seen = seq_idx[row].tolist(), set()
        for t, i in enumerate(ids):
            if i in seen and i != ids[t - 1]:
                raise ValueError(f"{name}: segment id {i} reappears at step {t} of row {row} after another segment; "
                                 "segments must be contiguous in time (give each document its own id)")
            seen.add(i)


def seq_idx_from_padding(lengths: Tensor, total: int) -> Tensor:
    """Left padding: row b holds lengths[b] real tokens at the end -> seq_idx (B, total), pads -1."""
    t = torch.arange(total, device=lengths.device)
    return torch.where(t[None] >= total - lengths[:, None], 0, -1).long()


def segment_positions(seq_idx: Tensor, prev_seq: Tensor | None = None, prev_next_pos: Tensor | None = None) -> Tensor:
    """Position of each step inside its segment, (B, T) int64.

    `prev_seq` (B,) and `prev_next_pos` (B,) describe what came before (a decoding cache): if the
    first new step continues the previous segment, counting continues from `prev_next_pos`.
    """
    B, T = seq_idx.shape
    t = torch.arange(T, device=seq_idx.device).expand(B, T)
    new_segment = torch.ones_like(seq_idx, dtype=torch.bool)
    new_segment[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    offset = torch.zeros(B, dtype=torch.long, device=seq_idx.device)
    if prev_seq is not None:
        cont = seq_idx[:, 0] == prev_seq
        new_segment[:, 0] = ~cont
        offset = torch.where(cont, prev_next_pos, 0)
    start = torch.where(new_segment, t, 0).cummax(dim=1).values  # index where each segment began
    # steps of the continued first segment (no new start yet) count on from offset
    first = ~new_segment.cumsum(dim=1).bool()
    return torch.where(first, t + offset[:, None], t - start)


def same_segment(q_seq: Tensor, k_seq: Tensor) -> Tensor:
    """(B, Tq), (B, S) -> bool (B, Tq, S): query and key lie in the same segment."""
    return q_seq[:, :, None] == k_seq[:, None, :]


def segment_starts(seq_idx: Tensor | None, B: int, T: int, device: torch.device) -> Tensor:
    """Bool (B, T): step t starts a new segment (never step 0: a scan's initial state belongs to it)."""
    starts = torch.zeros(B, T, dtype=torch.bool, device=device)
    if seq_idx is not None:
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def segment_blocks(seq_idx: Tensor, Tq: int) -> tuple[list[int], list[int], list[int]]:
    """Segments as the blocks of a variable-length ("varlen") attention kernel, on the host.

    seq_idx (B, S) with the queries the last Tq of the S positions -> (q_lens, kv_lens, kv_starts):
    one block per (row, segment that holds queries), row by row; kv_starts[b] is where row b's first
    such segment begins (keys before it are never seen). Reads the ids on the host (one device sync).
    """
    S = seq_idx.shape[1]
    q_lens, kv_lens, kv_starts = [], [], []
    for b, row in enumerate(seq_idx.tolist()):
        starts = [0] + [t for t in range(1, S) if row[t] != row[t - 1]]
        seg_ids = [row[s] for s in starts]
        if len(set(seg_ids)) != len(seg_ids):
            raise ValueError(f"seq_idx row {b}: segments must be contiguous in time; got ids {seg_ids} in that order")
        ends = starts[1:] + [S]
        kept = [(s, e) for s, e in zip(starts, ends) if e > S - Tq]
        kv_starts.append(kept[0][0])
        for s, e in kept:
            q_lens.append(e - max(s, S - Tq))
            kv_lens.append(e - s)
    return q_lens, kv_lens, kv_starts


def varlen_keys(t: Tensor, kv_starts: list[int]) -> Tensor:
    """(B, S, ...) -> (sum over rows of S - kv_starts[b], ...): each row's keys from kv_starts[b] on, rows concatenated."""
    if not any(kv_starts):
        return t.flatten(0, 1)
    return torch.cat([t[b, s:] for b, s in enumerate(kv_starts)])
