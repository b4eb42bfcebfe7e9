"""DeepSpeed ZeRO 1/2/3 at DP=2 against DP=1 with the same global batch."""

from __future__ import annotations

import pytest

from tests.parallel.common import config, model_for, reference_losses
from tests.parallel.conftest import ZERO_STAGES


@pytest.fixture(scope="module")
def dp1_losses():
    return reference_losses(config("mor"))


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_zero_dp2_equals_dp1(world2, dp1_losses, stage):
    for r in world2:
        assert r["zero_cases"][stage]["losses"] == pytest.approx(dp1_losses, abs=1e-5)


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_zero_halves_optimizer_state(world2, stage, capsys):
    n_params = sum(p.numel() for p in model_for(config("mor")).parameters())
    dp1_bytes = 12 * n_params  # fp32 master copy + exp_avg + exp_avg_sq, unsharded
    for rank, r in enumerate(world2):
        got = r["zero_cases"][stage]["bytes"]
        with capsys.disabled():
            print(f"\nZeRO-{stage} rank {rank}: {got} (DP=1 optimizer state {dp1_bytes})")
        assert got["optimizer"] == pytest.approx(dp1_bytes / 2, rel=0.05)
