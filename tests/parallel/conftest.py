"""The spawned worlds, shared by the test files: every 2-rank case runs in ONE world (imports cost
~15 s per rank), likewise the 3- and 4-rank cases. Each test file asserts on its part."""

from __future__ import annotations

import pytest

from tests.parallel import workers
from tests.parallel.spawn import run_world

TP_CASES = [
    ("mor", ()),  # expert-choice, recursion-wise KV
    ("mor_kvshare", ()),  # expert-choice, recursive KV sharing
    ("mor_token", ()),  # token-choice, balancing loss
    ("mor_token", ("routing.balancing=loss_free",)),  # token-choice, loss-free balancing (load all-reduce)
]
ZERO_STAGES = [1, 2, 3]

WORLD2_JOBS = [("tp_cases", (TP_CASES,)), ("zero_cases", (ZERO_STAGES,))]


@pytest.fixture(scope="session")
def world2():
    return run_world(workers.run_all, 2, WORLD2_JOBS)
