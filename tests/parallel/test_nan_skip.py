"""train.nan_policy=skip skips the update for real: weights, buffers, the optimizer's moments and
step counts after a skipped step are those before it (the old lr-0 step moved Adam's state). So does
any step with non-finite gradients under a finite loss, whatever the policy: unguarded, torch's AdamW
at ZeRO stage 0 applied them and every weight became NaN (then saved by the next checkpoint)."""

from __future__ import annotations

import math

import pytest
import torch

from mor_dist.parallel.local_world import run_world
from tests.parallel import workers

CASES = [
    ("mor", ("parallel.zero_stage=0",)),  # DeepSpeed steps the plain torch AdamW
    ("mor", ("parallel.zero_stage=1",)),
    ("mor", ("parallel.zero_stage=2",)),
    ("mor", ("parallel.zero_stage=3",)),
    ("mor_token", ("parallel.zero_stage=1", "routing.balancing=loss_free")),  # router bias from loads
]


GRAD_CASES = [
    ("mor", ("parallel.zero_stage=0",)),  # torch's AdamW, guarded (engine.NonFiniteGuard)
    ("mor", ("parallel.zero_stage=1",)),  # DeepSpeed's own overflow check
]


@pytest.fixture(scope="module")
def results():
    return run_world(workers.nan_skip_cases, 1, CASES)[0]


@pytest.fixture(scope="module")
def grad_results():
    return run_world(workers.nan_skip_cases, 1, GRAD_CASES, True)[0]


def _diffs(a, b, path=""):
    """Paths at which two nested states differ."""
    if isinstance(a, dict):
        keys = set(a) | set(b)
        return [d for k in sorted(keys, key=str) for d in _diffs(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diffs(x, y, f"{path}[{i}]")]
    if torch.is_tensor(a):
        return [] if torch.is_tensor(b) and torch.equal(a, b) else [path]
    return [] if a == b else [path]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'-'.join(c[1])}")
def test_skipped_step_leaves_weights_and_optimizer_untouched(results, case):
    got = results[case]
    assert got["skipped"]["skipped"] and math.isnan(got["skipped"]["loss"])
    assert _diffs(got["before"]["model"], got["after"]["model"]) == []
    assert _diffs(got["before"]["optimizer"], got["after"]["optimizer"]) == []
    # The next good step trains normally from there: weights and moments move.
    assert not got["good"]["skipped"] and math.isfinite(got["good"]["loss"])
    assert _diffs(got["after"]["model"], got["moved"]["model"]) != []
    assert _diffs(got["after"]["optimizer"], got["moved"]["optimizer"]) != []


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c[0]}-{'-'.join(c[1])}")
def test_infinite_gradient_under_a_finite_loss_is_not_applied(grad_results, case):
    got = grad_results[case]
    assert got["skipped"]["skipped"] and math.isfinite(got["skipped"]["loss"])
    assert _diffs(got["before"]["model"], got["after"]["model"]) == []
    assert _diffs(got["before"]["optimizer"], got["after"]["optimizer"]) == []
    assert not got["good"]["skipped"]
    assert _diffs(got["after"]["model"], got["moved"]["model"]) != []
