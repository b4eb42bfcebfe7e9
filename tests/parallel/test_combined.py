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
    want = [(0, 0), (0, 1), (1, 0), (1, 1)] if "parallel.pipeline=2" in case[1] else [(0, 0), (0, 0), (0, 1), (0, 1)]
    assert layout == want
