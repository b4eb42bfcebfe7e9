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

    @property
    def batch(self) -> int:
        return self.q_start.shape[0]

    @staticmethod
    def from_cu_seqlens(cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int) -> "Segments":
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        return Segments(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], max_q, max_k, packed=True)

    @staticmethod
    def from_lengths(len_q: torch.Tensor, len_k: torch.Tensor, max_q: int, max_k: int) -> "Segments":
        zeros = torch.zeros_like(len_q, dtype=torch.int32)
        return Segments(zeros, len_q.to(torch.int32), zeros, len_k.to(torch.int32), max_q, max_k, packed=False)

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
