"""Kernel tests run the Triton kernels on a GPU when there is one, else under Triton's interpreter.

Triton fixes compiled-vs-interpreted for every @triton.jit function, its own tl.sum/tl.max included,
when the function is decorated, i.e. when triton is first imported. In a whole-suite run something
(torch._dynamo, megatron, deepspeed) has usually imported triton long before this directory is
collected, and setting TRITON_INTERPRET in this process would also switch every later Triton import of
other packages to the interpreter. So this process never sets it: on a CPU-only machine the tests that
launch kernels (those taking the `device` fixture) run together in one child pytest started with
TRITON_INTERPRET=1, and each reports the child's outcome. When this process already interprets
(`TRITON_INTERPRET=1 pytest tests/kernels`), they run in place.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from mor_dist.kernels.triton_env import interpreting, triton_available

_RESULTS_ENV = "MOR_KERNEL_TEST_RESULTS"  # set in the child: where it writes its outcomes


def _interpreter_ready() -> bool:
    if not interpreting():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def _delegated(item) -> bool:
    return (
        "device" in getattr(item, "fixturenames", ())
        and not torch.cuda.is_available()
        and triton_available()
        and not _interpreter_ready()
    )


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: cuda, else cpu under the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if not triton_available():
        pytest.skip("triton is not installed")
    return "cpu"


def _child_outcomes(session) -> dict:
    if getattr(session, "_kernel_child_outcomes", None) is None:
        nodeids = [item.nodeid for item in session.items if _delegated(item)]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "outcomes.json")
            env = dict(os.environ, TRITON_INTERPRET="1", **{_RESULTS_ENV: path})
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids],
                cwd=session.config.rootpath, env=env, capture_output=True, text=True, timeout=1800,
            )
            outcomes = {}
            if os.path.exists(path):
                with open(path) as f:
                    outcomes = json.load(f)
        session._kernel_child_outcomes = outcomes
        session._kernel_child_log = proc.stdout[-4000:] + proc.stderr[-4000:]
    return session._kernel_child_outcomes


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not _delegated(pyfuncitem):
        return None
    outcome = _child_outcomes(pyfuncitem.session).get(pyfuncitem.nodeid)
    if outcome is None:
        pytest.fail(f"no result from the interpreter child process:\n{pyfuncitem.session._kernel_child_log}")
    if outcome["outcome"] == "skipped":
        pytest.skip(outcome["detail"])
    if outcome["outcome"] != "passed":
        pytest.fail(f"in the interpreter child process:\n{outcome['detail']}", pytrace=False)
    return True


def pytest_runtest_logreport(report):
    path = os.environ.get(_RESULTS_ENV)
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    outcomes = {}
    if os.path.exists(path):
        with open(path) as f:
            outcomes = json.load(f)
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        detail = report.longrepr[2]
    else:
        detail = str(report.longrepr or "")
    outcomes[report.nodeid] = {"outcome": report.outcome, "detail": detail}
    with open(path, "w") as f:
        json.dump(outcomes, f)


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
