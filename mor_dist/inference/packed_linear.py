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
are not seen). The packed copies cost about one more copy of the weights' memory, for as long as the
model keeps them (a serving engine packs the model it is given).
The attention and MLP modules also get one packed product for the projections of one input (q, k,
v; gate, up): fewer, larger matmuls (the k and v ones alone are small and ran at ~0.6 of the
large ones' rate); the model calls them through `project_qkv` / `project_gate_up`, which this
replaces per instance.
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
    """One weight, or several stacked along the output dimension (fused projections), and their
    packed copy, repacked when any of them changed (storage, version or dtype)."""

    def __init__(self, *weights: torch.Tensor):
        self.weights, self.packed, self.key = weights, None, None

    def fits(self, x: torch.Tensor) -> bool:
        """The packed product may serve x: no gradient wanted, CPU tensors of one packable dtype."""
        return (x.device.type == "cpu" and x.dtype in _DTYPES
                and all(w.device.type == "cpu" and w.dtype == x.dtype for w in self.weights)
                and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in self.weights))))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fits(x):
            assert len(self.weights) == 1, "a fused weight's caller checks fits() and falls back itself"
            return F.linear(x, self.weights[0], bias)
        key = tuple((w.data_ptr(), w._version, w.dtype) for w in self.weights)
        if key != self.key:
            w = self.weights[0] if len(self.weights) == 1 else torch.cat(self.weights)
            # The batch-size hint only picks the blocked format: any row count reads it at full speed.
            self.packed, self.key = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16), key
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self._mor_packed.weights[0] is not self.weight:  # the parameter object was replaced
        self._mor_packed = PackedWeight(self.weight)
    return self._mor_packed.linear(x, self.bias)


def _fused(module: nn.Module, x: torch.Tensor, linears: tuple[nn.Linear, ...]):
    """The outputs of `linears` (bias-free: checked when packing) on x from one product with their
    stacked packed weights, or None where that cannot serve x (the module's own per-projection path
    runs then)."""
    weights = tuple(lin.weight for lin in linears)
    fused = module.__dict__["_mor_fused"]
    if any(a is not b for a, b in zip(fused.weights, weights)):  # a parameter object was replaced
        fused = module.__dict__["_mor_fused"] = PackedWeight(*weights)
    if not fused.fits(x):
        return None
    return fused.linear(x).split([w.shape[0] for w in weights], dim=-1)


def _fused_qkv(self, x: torch.Tensor):
    out = _fused(self, x, (self.wq, self.wk, self.wv))
    return out if out is not None else type(self).project_qkv(self, x)


def _fused_gate_up(self, x: torch.Tensor):
    out = _fused(self, x, (self.w_gate, self.w_up))
    return out if out is not None else type(self).project_gate_up(self, x)


# Modules whose projections of one input are fused: (method the model calls, its Linear children, fused method).
_FUSIONS = (("project_qkv", ("wq", "wk", "wv"), _fused_qkv), ("project_gate_up", ("w_gate", "w_up"), _fused_gate_up))


def pack_linears(model: nn.Module) -> int:
    """Give every nn.Linear of `model` the packed forward (packed lazily, on its first call; idempotent),
    and the attention and MLP modules one packed product for their q/k/v and gate/up projections
    (fewer, larger products: the small k and v ones ran at ~0.6 of the large ones' rate);
    returns how many Linears have it. A no-op (0) where oneDNN is not available."""
    if not available():
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if "_mor_packed" not in module.__dict__:
                module.__dict__["_mor_packed"] = PackedWeight(module.weight)
                module.forward = types.MethodType(_packed_forward, module)
            n += 1
        for method, names, fused in _FUSIONS:
            children = [getattr(module, name, None) for name in names]
            if hasattr(type(module), method) and "_mor_fused" not in module.__dict__ \
                    and all(isinstance(c, nn.Linear) and c.bias is None for c in children):
                module.__dict__["_mor_fused"] = PackedWeight(*(c.weight for c in children))
                setattr(module, method, types.MethodType(fused, module))
    return n


def unpack_linears(model: nn.Module) -> None:
    """Back to nn.Linear's own forward and the modules' own projections; the packed copies are freed."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and "_mor_packed" in module.__dict__:
            for name in ("forward", "_mor_packed"):
                module.__dict__.pop(name, None)
        if "_mor_fused" in module.__dict__:
            for name in ("_mor_fused", "project_qkv", "project_gate_up"):
                module.__dict__.pop(name, None)
