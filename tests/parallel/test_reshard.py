"""Resume at another layout (reshard_workers.py): after each conversion every parameter, Adam moment,
step count and buffer equals the saved run's bit for bit, and the resumed steps' losses match an
uninterrupted run at the new layout within 1e-5 (fp32, CPU)."""

from __future__ import annotations

import math

import pytest

from tests.parallel.conftest import RESHARD2, RESHARD3, RESHARD4

HOPS = [(world, name, k) for world, chains in (("world2", RESHARD2), ("world3", RESHARD3), ("world4", RESHARD4))
        for name, layouts in chains for k in range(1, len(layouts))]


@pytest.mark.parametrize("world, name, hop", HOPS, ids=[f"{w}-{n}-{k}" for w, n, k in HOPS])
def test_resume_at_another_layout(request, world, name, hop):
    for rank, results in enumerate(request.getfixturevalue(world)):
        got = results["reshard_chains"][(name, hop)]
        assert got["converted"], got["layouts"]
        wrong = [what for what, same in got["matches"].items() if not same]
        assert len(got["matches"]) > 3 and not wrong, (rank, got["layouts"], wrong)
        assert all(math.isfinite(x) for x in got["resumed"]), got
        diff = max(abs(a - b) for a, b in zip(got["resumed"], got["reference"], strict=True))
        assert diff < 1e-5, (rank, got["layouts"], got["resumed"], got["reference"])
