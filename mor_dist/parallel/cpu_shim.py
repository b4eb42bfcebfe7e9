"""megatron-core on a machine without a GPU: the two CUDA calls it makes unconditionally.

megatron-core 0.16 allocates gather buffers and the global memory buffer with
`device=torch.cuda.current_device()` and calls `torch.cuda.synchronize()` in a few places
(../shared/docs/cpu-stack.md). On CPU both fail. With this shim, `current_device()` answers "cpu"
(a valid `device=` argument) and `synchronize()` does nothing. Nothing else is patched: the parallel
layers, mappings and vocab-parallel cross-entropy then run unchanged over gloo.

Active only when no GPU is present; install() is idempotent and is called by tensor_parallel.py
before any megatron layer is built.
"""

from __future__ import annotations

import torch

_installed = False


def install() -> bool:
    """Patch torch.cuda for megatron-core when CUDA is absent. Returns whether the shim is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if not _installed:
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda device=None: None
        _installed = True
    return True
