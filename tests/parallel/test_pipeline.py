"""Pipeline stages (DeepSpeed PipelineEngine, 1F1B) against the single-process model."""

from __future__ import annotations

import pytest
import torch

from mor_dist.parallel.dims import ParallelLayoutError
from mor_dist.parallel.stages import stage_plan
from tests.parallel.common import config, reference_eval, reference_losses
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
    # Causal-mode eval: the last stage's loss and depths reach every stage, and equal one process's.
    want_loss, want_depth = reference_eval(config(name), trained_steps=6)  # pp_cases evaluates after 6 steps
    for r in got:
        assert r["eval"][0] == pytest.approx(want_loss, abs=1e-5)
        assert torch.equal(r["eval"][1], want_depth)
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
    pinned = any(o.startswith(("parallel.stage_recursions", "parallel.stage_layers")) for o in case[1])
    # Default plan [2, 4, 0] (recursions 1 | 2-3 | -): FLOPs-balanced (the head weighs on the last stage).
    assert [r["stage"] for r in got if "shared" in r["tied"]] == ([0, 1, 2] if pinned else [0, 1])
    assert [r["stage"] for r in got if "embed" in r["tied"]] == [0, 2]


def test_stage_plan_default_and_pinned():
    """Plans count shared-layer passes (tiny: 3 recursions x 2 block layers)."""
    assert stage_plan(config("mor", ["parallel.pipeline=2"])) == [4, 2]
    assert stage_plan(config("mor", ["parallel.pipeline=3"])) == [2, 4, 0]
    assert stage_plan(config("mor", ["parallel.pipeline=4"])) == [0, 2, 4, 0]
    assert stage_plan(config("mor", ["parallel.pipeline=2", "parallel.stage_recursions=[0,3]"])) == [0, 6]
    assert stage_plan(config("mor", ["parallel.pipeline=3", "parallel.stage_layers=[1,4,1]"])) == [1, 4, 1]
    with pytest.raises(ParallelLayoutError, match="every middle stage"):
        stage_plan(config("mor", ["parallel.pipeline=3", "parallel.stage_layers=[6,0,0]"]))
    # More middle stages than recursions: cuts inside recursions fill them; past the passes, refused.
    assert all(stage_plan(config("mor", ["parallel.pipeline=8"]))[1:-1])
    with pytest.raises(ParallelLayoutError, match="7 middle stages for 3 recursions of 2 layers"):
        stage_plan(config("mor", ["parallel.pipeline=9"]))


def test_stage_spans_and_description():
    from mor_dist.parallel.stages import describe_plan, stage_spans

    assert stage_spans([1, 4, 1], 2) == [[(0, 0, 1)], [(0, 1, 2), (1, 0, 2), (2, 0, 1)], [(2, 1, 2)]]
    assert stage_spans([0, 6], 2) == [[], [(0, 0, 2), (1, 0, 2), (2, 0, 2)]]
    cfg = config("mor", ["parallel.pipeline=3"])
    assert describe_plan(cfg, [1, 4, 1]) == "r1 L1 / r1 L2, r2, r3 L1 / r3 L2"
    assert describe_plan(cfg, [0, 6, 0]) == "- / r1, r2, r3 / -"


def _all_splits(n: int, pp: int):
    import itertools

    for cut in itertools.combinations_with_replacement(range(n + 1), pp - 1):
        bounds = [0, *cut, n]
        plan = [bounds[i + 1] - bounds[i] for i in range(pp)]
        if all(plan[1:-1]):
            yield plan


def test_default_plan_minimizes_the_slowest_stage():
    """Against every split of the shared-layer passes: none has a slowest stage lighter by more than
    SPLIT_GAIN (a cut inside a recursion must earn its extra activation), and none cut between
    recursions has a lighter one at all."""
    from mor_dist.parallel.stages import SPLIT_GAIN, stage_flops

    for name, pp in (("mor", 2), ("mor", 3), ("mor_token", 3), ("recursive", 4), ("mor", 4)):
        cfg = config(name, [f"parallel.pipeline={pp}"])
        best = max(stage_flops(cfg, stage_plan(cfg)))
        block = 2
        for plan in _all_splits(cfg.model.recursions * block, pp):
            slowest = max(stage_flops(cfg, plan))
            assert best <= slowest * (1 + SPLIT_GAIN) + 1e-6, (name, pp, plan)
            if all(n % block == 0 for n in plan):
                assert best <= slowest + 1e-6, (name, pp, plan)


@pytest.mark.parametrize("preset", ["135m", "360m", "730m", "1.7b"])
def test_paper_presets_are_balanced_at_pp_2_3_4(preset):
    """Later recursions run fewer tokens (capacity 1, 2/3, 1/3...): weighing the shared-layer passes
    by FLOPs, and cutting inside a recursion where that helps, keeps the slowest stage within 1.25x
    of the mean for every paper preset at 2, 3 and 4 stages."""
    from mor_dist.config import load_config
    from mor_dist.parallel.stages import stage_flops

    for kind in ("mor_nr2", "mor_nr3", "mor_nr4", "recursive_nr2", "recursive_nr3", "recursive_nr4"):
        for pp in (2, 3, 4):
            cfg = load_config(f"configs/paper/{preset}/{kind}.yaml", [f"parallel.pipeline={pp}"])
            flops = stage_flops(cfg, stage_plan(cfg))
            assert max(flops) / (sum(flops) / pp) <= 1.25, (preset, kind, pp, flops)


def test_kv_share_keeps_the_recursions_on_one_stage():
    """Recursion 1's K/V cannot cross a stage: the default plan puts every recursion on one stage,
    a pinned plan that splits them is refused by name."""
    plan = stage_plan(config("mor_kvshare", ["parallel.pipeline=2"]))
    assert sorted(plan) == [0, 6]
    with pytest.raises(ParallelLayoutError, match="kv.strategy.*parallel.pipeline"):
        stage_plan(config("mor_kvshare", ["parallel.pipeline=2", "parallel.stage_recursions=[1,2]"]))


def test_stage_params_follow_the_passes():
    """`mor plan` places each router on the stage that routes its recursion (runs its first pass)
    and the shared block on every stage that runs part of it."""
    from mor_dist.model import build_model
    from mor_dist.parallel.plan import stage_params

    cfg = config("mor", ["parallel.pipeline=3", "parallel.stage_layers=[1,4,1]"])
    model = build_model(cfg)
    n = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    router, shared = n([model.routers[0]]), n([model.shared])
    embed, prefix, last = n([model.embed]), n([model.prefix]), n([model.suffix, model.norm])
    tied_head = embed if model.head is None else n([model.head])
    assert stage_params(cfg) == [embed + prefix + shared + router, shared + 2 * router, shared + last + tied_head]


def test_stage_balance_bench_runs(capsys):
    """bench/stage_balance.py: every preset's default plan, and the worst imbalance line."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("stage_balance", "bench/stage_balance.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--json", "--pp", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 24 and all(r["imbalance"] <= r["whole_recursions_imbalance"] + 1e-9 for r in rows)


@pytest.mark.parametrize("name, overrides, silent_router", [
    ("mor", [], None), ("mor", ["routing.gating=none"], None), ("mor_token", [], None), ("recursive", [], None),
    ("mor", [], 1),  # causal mode: router 2 stops every token, so recursion 3 receives none
])
@pytest.mark.parametrize("mode", ["topk", "causal"])
def test_activation_tuple_round_trip_at_every_cut(name, overrides, silent_router, mode):
    """The stage tuple taken and rebuilt after every shared-layer pass (between and inside
    recursions, as consecutive stages would) continues the forward exactly; and no cut sends more
    floats before aux than an earlier one (DeepSpeed reuses receive buffers by position)."""
    from mor_dist.model import build_model
    from mor_dist.parallel.stages import aux_names, pack, stage_spans, unpack

    torch.manual_seed(0)
    model = build_model(config(name, overrides)).eval()
    if silent_router is not None:  # its causal decision stops every token
        model.routers[silent_router].causal_logits = lambda h, logits: torch.full_like(logits, -1.0)
    names = aux_names(model, 16)
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(1))
    block, nr = model.layout.block, model.layout.recursions
    with torch.no_grad():
        ref = model(tokens, mode=mode)
        state, aux, floats = model.begin(tokens, mode), None, []
        for at in range(nr * block + 1):
            acts = tuple(a.clone() for a in pack(state, names, aux, model, at))  # a fresh stage's copy
            floats.append(sum(1 for a in acts if a.is_floating_point()) - 1)  # before aux
            state, aux = unpack(acts, mode, model, at)
            if at < nr * block:
                (r, lo, hi), = stage_spans([at, 1], block)[1]
                state = model.step(r, state, (lo, hi))
        out = model.finish(state)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.depth, ref.depth)
    assert floats == sorted(floats, reverse=True), floats
    if silent_router is not None and mode == "causal":
        assert int(ref.depth.max()) == silent_router  # the case is what it says: nobody reaches the last step
