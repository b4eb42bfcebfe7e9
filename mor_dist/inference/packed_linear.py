"""CPU serving: every nn.Linear's weight prepacked once into oneDNN's blocked layout.

Decoding multiplies a few rows (the tokens of one tick) by each weight. MKL's GEMM packs the weight
again on every call, which dominates at few rows: on the development machine a 13 x 1024 by
1024 x 2816 product ran at 46 GFLOP/s against 67 at 32 rows, while a prepacked oneDNN weight ran
at 101 and 95 (bench/packed_linear.py; the same idea as inductor's CPU weight prepacking under
freezing, and the CPU backends of serving engines). MoR suffers more from it than vanilla, since
its unique first and last layers and the head see only the tokens entering or leaving the
recursions each tick.

`pack_linears(model)` keeps each module an nn.Linear with its own parameters (state_dict,
isinstance and training untouched) and gives it a forward that uses the packed copy only when it
may: no gradient wanted, a CPU input of the weight's dtype, and a weight unchanged since packing
(its storage and version are checked on every call, so an optimizer step, load_state_dict or a
.to() repacks rather than reading a stale copy; writes through `.data` bypass the version counter and
are not seen). The packed copies cost one more copy of the weights' memory, for as long as the
model keeps them (a serving engine packs the model it is given).
`unpack_linears(model)` restores the plain forward (torch.compile traces that one).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedWeight:
    """A weight and its packed copy, repacked when the weight changed (storage, version or dtype)."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.packed, self.key = weight, None, None

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight
        if (x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype or w.dtype not in _DTYPES
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return F.linear(x, w, bias)
        key = (w.data_ptr(), w._version, w.dtype)
        if key != self.key:
            # The batch-size hint only picks the blocked format: any row count reads it at full speed.
            self.packed, self.key = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16), key
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self._mor_packed.weight is not self.weight:  # the parameter object was replaced
        self._mor_packed = PackedWeight(self.weight)
    return self._mor_packed.linear(x, self.bias)


def pack_linears(model: nn.Module) -> int:
    """Give every nn.Linear of `model` the packed forward (packed lazily, on its first call; idempotent);
    returns how many have it. A no-op (0) where oneDNN is not available."""
    if not available():
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if "_mor_packed" not in module.__dict__:
                module.__dict__["_mor_packed"] = PackedWeight(module.weight)
                module.forward = types.MethodType(_packed_forward, module)
            n += 1
    return n


def unpack_linears(model: nn.Module) -> None:
    """Back to nn.Linear's own forward; the packed copies are freed."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and "_mor_packed" in module.__dict__:
            for name in ("forward", "_mor_packed"):
                module.__dict__.pop(name, None)
