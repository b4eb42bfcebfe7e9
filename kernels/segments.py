"""Where each sequence's rows lie, for the two layouts the Triton kernels read in place.

Sequence b owns rows [start[b], end[b]) of its batch slab; a tensor element (b, head h, row i, d) is at
b * stride_b + h * stride_h + i * stride_t + d.

- packed (varlen): q is (total, H, D), every sequence shares one slab (stride_b = 0) and the row
  ranges come from cumulative lengths.
- padded: q is (B, H, T, D) (any strides with a contiguous last dim), rows start at 0 and the first
  len[b] slots of row b are the real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    q_start: torch.Tensor  # (B,) int32
    q_end: torch.Tensor
    k_start: torch.Tensor
    k_end: torch.Tensor
    max_q: int  # upper bound on end - start, sizes the grid
    max_k: int
    packed: bool
    # (B,) int32, 1 where the sequence's query positions ascend. Keys must ascend; queries need not,
    # but only ascending ones let the dK/dV walk skip query blocks (others are walked whole, masked).
    q_ascending: torch.Tensor

    @property
    def batch(self) -> int:
        return self.q_start.shape[0]

    @staticmethod
    def from_cu_seqlens(cu_q, cu_k, max_q: int, max_k: int, q_pos: torch.Tensor) -> "Segments":
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        asc = _ascending_packed(q_pos, cu_q)
        return Segments(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], max_q, max_k, True, asc)

    @staticmethod
    def from_lengths(len_q, len_k, max_q: int, max_k: int, q_pos: torch.Tensor) -> "Segments":
        zeros = torch.zeros_like(len_q, dtype=torch.int32)
        len_q, len_k = len_q.to(torch.int32), len_k.to(torch.int32)
        return Segments(zeros, len_q, zeros, len_k, max_q, max_k, False, _ascending_padded(q_pos, len_q))

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(stride_b, stride_h, stride_t) of a head tensor in this layout."""
        assert t.stride(-1) == 1, "last dim must be contiguous"
        if self.packed:
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def pos_strides(self, pos: torch.Tensor) -> tuple[int, int]:
        """(stride_b, stride_t) of a position tensor: (total,) packed, (B, T) padded."""
        if self.packed:
            return 0, pos.stride(0)
        return pos.stride(0), pos.stride(1)

    def new_rowstat(self, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """fp32 per (head, query row) buffer (logsumexp, delta) and its (stride_b, stride_h)."""
        if self.packed:
            buf = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)
            return buf, 0, buf.stride(0)
        buf = torch.empty(q.shape[0], q.shape[1], q.shape[2], device=q.device, dtype=torch.float32)
        return buf, buf.stride(0), buf.stride(1)


def _ascending_padded(pos: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Per row of (B, T) positions: do the first lens[b] ascend? On device, no sync."""
    if pos.shape[1] < 2:
        return torch.ones(pos.shape[0], dtype=torch.int32, device=pos.device)
    tail = torch.arange(1, pos.shape[1], device=pos.device) >= lens[:, None]  # pairs past the length
    return ((pos[:, 1:] >= pos[:, :-1]) | tail).all(dim=1).to(torch.int32)


def _ascending_packed(pos: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Per packed sequence: do its positions ascend? A descent at a sequence start does not count."""
    n_seq, total = cu.numel() - 1, pos.shape[0]
    if total < 2:
        return torch.ones(n_seq, dtype=torch.int32, device=pos.device)
    cu = cu.long()
    idx = torch.arange(1, total, device=pos.device)
    seq = torch.searchsorted(cu[1:], idx, right=True)  # the sequence holding element idx
    descent = (pos[1:] < pos[:-1]) & (cu[:-1][seq] != idx)
    bad = torch.zeros(n_seq, dtype=torch.int32, device=pos.device).index_add_(0, seq, descent.to(torch.int32))
    return (bad == 0).to(torch.int32)
