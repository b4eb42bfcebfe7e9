"""Four ranks: TP2 x PP2 and TP2 x DP2 against the single-process losses."""

from __future__ import annotations

import pytest

from tests.parallel.common import config, reference_losses
from tests.parallel.conftest import WORLD4_CASES


@pytest.mark.parametrize("case", WORLD4_CASES, ids=lambda c: "-".join(c[1]))
def test_four_ranks_match_one(world4, case):
    ref = reference_losses(config(case[0]))  # sequence parallelism changes no number either
    got = [r["pp_cases"][case] for r in world4]
    for r in got:
        assert r["losses"] == pytest.approx(ref, abs=1e-5)
    layout = sorted((r["stage"], r["tp_rank"]) for r in got)
    if "parallel.pipeline=2" in case[1] and "parallel.tensor=2" in case[1]:
        want = [(0, 0), (0, 1), (1, 0), (1, 1)]
    elif "parallel.pipeline=2" in case[1]:  # PP2 x DP2
        want = [(0, 0), (0, 0), (1, 0), (1, 0)]
    else:  # TP2 x DP2
        want = [(0, 0), (0, 0), (0, 1), (0, 1)]
    assert layout == want


def test_pp2_dp2_shards_each_stages_optimizer(world2, world4):
    """ZeRO-1 inside the pipeline: with two data-parallel replicas of each stage, each rank holds
    half of its stage's optimizer state (PP2 x DP1 in the 2-rank world holds it all)."""
    case = ("mor", ("parallel.pipeline=2",))
    whole = {r["pp_cases"][case]["stage"]: r["pp_cases"][case]["bytes"]["optimizer"] for r in world2}
    for r in world4:
        got = r["pp_cases"][case]
        assert got["bytes"]["optimizer"] == pytest.approx(whole[got["stage"]] / 2, rel=0.05)
