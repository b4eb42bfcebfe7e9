"""Gradient norms per router and of the shared block (logged on logging steps), gathered whatever
the layout: under TP=2 (shards summed over the group) and ZeRO-2 at DP=2 (partitioned gradients)
they equal one process's norms of the step's accumulated gradients, before clipping."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.common import config, model_for, step_batches
from tests.parallel.conftest import GRAD_NORM_CASES


def reference_norms() -> dict:
    cfg = config("mor")
    model = model_for(cfg).train()
    micro = step_batches(cfg, 0)
    for tokens, targets in micro:
        (model(tokens, targets).loss / len(micro)).backward()

    def norm(module):
        return torch.sqrt(sum(p.grad.double().pow(2).sum() for p in module.parameters() if p.grad is not None)).item()

    out = {f"grad_norm/router_r{r + 1}": norm(m) for r, m in enumerate(model.routers)}
    out["grad_norm/shared_block"] = norm(model.shared)
    return out


@pytest.mark.parametrize("case", GRAD_NORM_CASES, ids=lambda c: c[0])
def test_group_grad_norms_match_one_process(world2, case):
    want = reference_norms()
    for r in world2:
        got = r["grad_norm_cases"][case]
        assert set(want) <= set(got)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-4), k
        assert got["grad_norm"] > got["grad_norm/shared_block"] > 0
