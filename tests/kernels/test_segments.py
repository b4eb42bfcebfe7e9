"""Segments: the per-sequence 'queries ascend' flag that lets the dK/dV walk skip query blocks."""

import torch

from mor_dist.kernels.segments import Segments


def test_ascending_flag_packed():
    # Sequences: [3, 5, 9] ascends; [1, 4] ascends (its drop from 9 is a sequence start); [] is empty;
    # [7, 2, 8] does not; [6] is one token.
    pos = torch.tensor([3, 5, 9, 1, 4, 7, 2, 8, 6])
    cu = torch.tensor([0, 3, 5, 5, 8, 9], dtype=torch.int32)
    seg = Segments.from_cu_seqlens(cu, cu, 3, 3, pos)
    assert seg.q_ascending.tolist() == [1, 1, 1, 0, 1]
    assert seg.q_start.tolist() == [0, 3, 5, 5, 8] and seg.q_end.tolist() == [3, 5, 5, 8, 9]


def test_ascending_flag_padded_ignores_slots_past_the_length():
    pos = torch.tensor([[1, 4, 0, 2], [5, 3, 6, 7], [2, 9, 9, 1]])
    lens = torch.tensor([2, 4, 3])
    seg = Segments.from_lengths(lens, lens, 4, 4, pos)
    assert seg.q_ascending.tolist() == [1, 0, 1]
    assert seg.q_start.tolist() == [0, 0, 0] and seg.q_end.tolist() == [2, 4, 3]
