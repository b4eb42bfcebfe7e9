"""Measure activation memory: the bytes autograd saves for backward during a forward pass.

Everything a forward pass keeps alive until backward goes through autograd's saved-tensor hooks, so
summing the distinct storages they see (parameters excluded) gives the activation bytes that `mor
plan` estimates. Used by the tests and bench/parallel_overhead.py to compare layouts (tensor vs
sequence parallel) and to check the plan. Regions under non-reentrant activation checkpointing pack
their tensors through their own hooks, so only what they keep (their inputs) is counted, as it should.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks


class SavedActivationBytes:
    """with SavedActivationBytes(model) as saved: loss = model(...).loss  ->  saved.bytes"""

    def __init__(self, model: torch.nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: dict[int, int] = {}
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._params and t.device.type != "meta":
            self._seen[ptr] = max(self._seen.get(ptr, 0), storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "SavedActivationBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
