"""Pipeline stages (DeepSpeed PipelineEngine, 1F1B) against the single-process model."""

from __future__ import annotations

import pytest
import torch

from mor_dist.parallel.dims import ParallelLayoutError
from mor_dist.parallel.stages import stage_plan
from tests.parallel.common import config, reference_losses
from tests.parallel.conftest import PP2_CASES, PP3_CASES

ids = lambda c: "-".join((c[0], *c[1]))  # noqa: E731


def _check(ranks, case):
    name, overrides = case
    ref = reference_losses(config(name))
    got = [r["pp_cases"][case] for r in ranks]
    for r in got:
        assert r["losses"] == pytest.approx(ref, abs=1e-5)
    # Every copy of a tied weight (shared block; embedding = head) is bit-identical after 5 steps.
    for key in ("shared", "embed"):
        holders = [r for r in got if key in r["tied"]]
        for r in holders[1:]:
            if r["tp_rank"] != holders[0]["tp_rank"]:
                continue
            for n, w in holders[0]["tied"][key].items():
                assert torch.equal(w, r["tied"][key][n]), f"{key}.{n} drifted between stages"
    assert len({r["stage"] for r in got if "shared" in r["tied"]}) >= 1
    # Causal-mode eval: the last stage's loss and depths reach every stage.
    assert all(r["eval"][0] == got[0]["eval"][0] for r in got)
    assert all(torch.equal(r["eval"][1], got[0]["eval"][1]) for r in got)
    return got


@pytest.mark.parametrize("case", PP2_CASES, ids=ids)
def test_pp2_equals_pp1(world2, case):
    got = _check(world2, case)
    # Metrics from every stage reach every rank: aux losses (last stage) and routing stats.
    metrics = [r["metrics"] for r in got]
    assert metrics[0] == metrics[1]
    if case[0] == "mor":
        for key in ("loss", "lm_loss", "aux/router_bce/r1", "aux/router_bce/r3", "stats/active_frac/r1",
                    "stats/active_frac/r3", "grad_norm"):
            assert key in metrics[0], key
        assert metrics[0]["stats/active_frac/r3"] == pytest.approx(int(32 / 3) / 32)  # k_3 = floor(T/3)
    holders = [r["stage"] for r in got if "shared" in r["tied"]]
    assert holders == ([0] if "parallel.stage_recursions=[3,0]" in case[1] else [0, 1])


@pytest.mark.parametrize("case", PP3_CASES, ids=ids)
def test_pp3_equals_pp1(world3, case):
    got = _check(world3, case)
    pinned = any(o.startswith("parallel.stage_recursions") for o in case[1])
    assert [r["stage"] for r in got if "shared" in r["tied"]] == ([0, 1, 2] if pinned else [1])
    assert [r["stage"] for r in got if "embed" in r["tied"]] == [0, 2]


def test_stage_plan_default_and_pinned():
    assert stage_plan(config("mor", ["parallel.pipeline=2"])) == [2, 1]
    assert stage_plan(config("mor", ["parallel.pipeline=3"])) == [0, 3, 0]
    assert stage_plan(config("mor", ["parallel.pipeline=4"])) == [0, 2, 1, 0]
    assert stage_plan(config("mor", ["parallel.pipeline=2", "parallel.stage_recursions=[0,3]"])) == [0, 3]


def test_kv_share_across_stages_rejected():
    with pytest.raises(ParallelLayoutError, match="kv.strategy.*parallel.pipeline"):
        stage_plan(config("mor_kvshare", ["parallel.pipeline=2"]))
