"""Routed attention for MoR: Triton kernels on GPU, the torch reference on CPU (see docs/kernels.md).

The Triton kernel modules (attention_fwd, attention_bwd) are imported at the first Triton call, not
here, so importing this package neither needs a GPU nor fixes Triton's interpreter mode.
"""

from .paged import paged_attention
from .reference import routed_attention_reference, routed_attention_varlen_reference
from .routed_attention import attention_backend, routed_attention, routed_attention_varlen

__all__ = [
    "attention_backend",
    "paged_attention",
    "routed_attention",
    "routed_attention_reference",
    "routed_attention_varlen",
    "routed_attention_varlen_reference",
]
