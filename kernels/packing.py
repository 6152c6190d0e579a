"""Packed sequences and left padding, expressed as segment ids.

Every op takes an optional `seq_idx`: an integer tensor (B, S) naming the segment (document) of
each time step. Two positions interact only when their segment ids are equal. This covers:
  * packing: `cu_seqlens` -> ids 0, 0, 0, 1, 1, 2, ... along one row (B = 1);
  * left padding: pads get id -1, the prompt id 0, so the prompt never sees the pads.
Segments must be contiguous in time. `None` means one segment per row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    """cu_seqlens (N+1,) int, starting at 0 -> seq_idx (1, total) int64."""
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
