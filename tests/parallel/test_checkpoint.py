"""The train module's save/load (DeepSpeed checkpoints) under ZeRO-2, ZeRO-3, PP=2 and TP=2: a fresh
module that loads a save continues exactly as the saving one did, reading every file through the
restricted unpickler, whose allow-list covers exactly what the files hold."""

from __future__ import annotations

import pytest

from tests.parallel.conftest import CKPT_CASES


@pytest.mark.parametrize("case", CKPT_CASES, ids=lambda c: c[0])
def test_resume_continues_exactly(world2, case):
    for r in world2:
        got = r["ckpt_cases"][case]
        assert got["resumed"] == pytest.approx(got["after"], abs=1e-6)
        assert got["counter"] == 2  # the model's optimizer-step counter (warmups) came back too


def test_checkpoint_files_hold_only_allow_listed_types(world2):
    from mor_dist.checkpoint.safe_load import DEEPSPEED_TYPES

    for case in CKPT_CASES:
        found = set(world2[0]["ckpt_cases"][case]["unsafe_globals"])
        assert found <= set(DEEPSPEED_TYPES), f"{case}: not allow-listed: {found - set(DEEPSPEED_TYPES)}"
    # The list is not wider than needed: every entry shows up in some save.
    assert set().union(*(world2[0]["ckpt_cases"][c]["unsafe_globals"] for c in CKPT_CASES)) == set(DEEPSPEED_TYPES)
