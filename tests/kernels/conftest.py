"""Kernel tests run the Triton kernels on a GPU when there is one, else under Triton's interpreter.

TRITON_INTERPRET is set here, at collection, only when CUDA is absent (on a GPU node it would push
every Triton kernel of the pytest process through the interpreter). It is early enough even when
another test package imported mor_dist.kernels first: the kernel modules are imported, and Triton
decides compiled-vs-interpreted, at the first Triton call, which happens while tests run. The flag
only changes what @triton.jit builds; torch itself (eager, and inductor's CPU C++ backend) ignores it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mor_dist.kernels.triton_env import interpreting, triton_available  # noqa: E402


@pytest.fixture
def device() -> str:
    """Where the Triton kernels can run in this process."""
    if torch.cuda.is_available():
        return "cuda"
    if not (triton_available() and interpreting()):
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return "cpu"


def random_active(lens, t, seed):
    """Sorted random subsets of range(t) of the given sizes: non-contiguous original positions."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(t, generator=g)[:n].sort().values for n in lens]


class VarlenCase:
    """Packed inputs for routed_attention_varlen plus an upstream gradient."""

    def __init__(self, q_pos, k_pos, hq=4, hkv=2, d=16, dtype=torch.float32, device="cpu", seed=0):
        g = torch.Generator().manual_seed(seed + 1)
        lens_q = [len(p) for p in q_pos]
        lens_k = [len(p) for p in k_pos]
        self.cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32).to(device)
        self.cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32).to(device)
        self.q_pos = torch.cat([torch.as_tensor(p, dtype=torch.long) for p in q_pos]).to(device)
        self.k_pos = torch.cat([torch.as_tensor(p, dtype=torch.long) for p in k_pos]).to(device)
        n_q, n_k = sum(lens_q), sum(lens_k)
        self.q = torch.randn(n_q, hq, d, generator=g).to(device, dtype)
        self.k = torch.randn(n_k, hkv, d, generator=g).to(device, dtype)
        self.v = torch.randn(n_k, hkv, d, generator=g).to(device, dtype)
        self.grad = torch.randn(n_q, hq, d, generator=g).to(device, dtype)
        self.max_q, self.max_k = max(lens_q, default=0), max(lens_k, default=0)

    def run(self, fn, upcast=False, **kwargs):
        """Output and (dq, dk, dv) of fn on this case; upcast runs it on fp32 copies of the inputs."""
        q, k, v = (x.detach().float() if upcast else x.detach() for x in (self.q, self.k, self.v))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out = fn(q, k, v, self.cu_q, self.cu_k, self.q_pos, self.k_pos, **kwargs)
        loss = (out.float() * self.grad.float()).sum()
        grads = torch.autograd.grad(loss, (q, k, v), allow_unused=True)  # unused: no query at all
        return out, tuple(torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), grads))


# (forward atol/rtol, gradient atol/rtol) against the fp32 reference on the same (rounded) inputs.
TOLERANCES = {
    torch.float32: ((2e-5, 2e-5), (1e-4, 1e-4)),
    torch.float16: ((4e-3, 4e-3), (1.5e-2, 1.5e-2)),
    torch.bfloat16: ((3e-2, 3e-2), (8e-2, 8e-2)),
}


# Helpers reach the test modules as fixtures, which works whatever pytest's import mode.
@pytest.fixture
def varlen_case():
    return VarlenCase


@pytest.fixture
def active_positions():
    return random_active


@pytest.fixture
def tolerances():
    return TOLERANCES
