"""The train module's save/load (DeepSpeed checkpoints) under ZeRO-2, PP=2 and TP=2: a fresh module
that loads a save continues exactly as the saving one did."""

from __future__ import annotations

import pytest

from tests.parallel.conftest import CKPT_CASES


@pytest.mark.parametrize("case", CKPT_CASES, ids=lambda c: c[0])
def test_resume_continues_exactly(world2, case):
    for r in world2:
        got = r["ckpt_cases"][case]
        assert got["resumed"] == pytest.approx(got["after"], abs=1e-6)
        assert got["counter"] == 2  # the model's optimizer-step counter (warmups) came back too
