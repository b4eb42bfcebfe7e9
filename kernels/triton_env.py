"""How the Triton kernels are built in this process: compiled for a GPU, or run by the interpreter.

Triton decides between the two when a function is decorated, reading TRITON_INTERPRET then. The
kernel modules are therefore imported only at the first Triton launch (see routed_attention.py), so
a test conftest that sets the variable during collection is early enough even when another package
imported mor_dist.kernels before it.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_mode(kernel, tensor: torch.Tensor) -> None:
    """Fail clearly instead of with '0 active drivers' when kernels built for a GPU meet CPU tensors
    (TRITON_INTERPRET was set only after the kernel modules were imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    if not tensor.is_cuda and not isinstance(getattr(kernel, "fn", kernel), InterpretedFunction):
        raise RuntimeError(
            "Triton kernels were compiled for a GPU but got CPU tensors: set TRITON_INTERPRET=1 before the "
            "first Triton call (mor_dist.kernels.attention_fwd/_bwd imports)"
        )


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting, so the kernel agrees with what SDPA/matmul would do.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def pow2_at_least(n: int, floor: int = 256) -> int:
    """Bucketed length bound: a compile-time constant (and autotune key) that changes only when a
    sequence length crosses a power of two, so varying token counts do not recompile or re-tune."""
    p = floor
    while p < n:
        p *= 2
    return p


def configs(gpu_table):
    """Autotune configs: the table on a GPU; one small config under the interpreter, which neither
    benchmarks several configs nor needs big tiles (16x16 tiles also make small tests cross blocks)."""
    import triton

    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu_table
    ]
