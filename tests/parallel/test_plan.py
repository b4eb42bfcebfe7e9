"""`mor plan` estimates against the per-rank bytes measured in the spawned runs (within 15%)."""

from __future__ import annotations

import pytest

from mor_dist.parallel.plan import estimate, main, parse_bytes
from tests.parallel.common import config
from tests.parallel.conftest import BF16_CASES, PP2_CASES, TP_CASES, ZERO_STAGES

TOL = 0.15


def _close(est, measured):
    assert measured > 0
    assert est == pytest.approx(measured, rel=TOL), f"estimate {est} vs measured {measured}"


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_plan_matches_zero_runs(world2, stage):
    est, dp = estimate(config("mor", [f"parallel.zero_stage={stage}"]), gpus=2)
    assert dp == 2
    for r in world2:
        got = r["zero_cases"][stage]["bytes"]
        _close(est[0].param_bytes, got["params"])
        _close(est[0].grad_bytes, got["grads"])
        _close(est[0].optimizer_bytes, got["optimizer"])


def test_plan_matches_tp2_run(world2):
    case = TP_CASES[0]
    est, _ = estimate(config(case[0], ["parallel.tensor=2", *case[1]]), gpus=2)
    for r in world2:
        got = r["tp_cases"][case]["bytes"]
        _close(est[0].param_bytes, got["params"])
        _close(est[0].grad_bytes, got["grads"])
        _close(est[0].optimizer_bytes, got["optimizer"])


# The default plans, and cuts inside a recursion (routers on the stage that routes them).
PLAN_PP2 = PP2_CASES[:2] + [c for c in PP2_CASES if any(o.startswith("parallel.stage_layers") for o in c[1])]


@pytest.mark.parametrize("case", PLAN_PP2, ids=lambda c: "-".join((c[0], *c[1])))
def test_plan_matches_pp2_run(world2, case):
    est, _ = estimate(config(case[0], list(case[1])), gpus=2)
    for r in world2:
        got = r["pp_cases"][case]
        _close(est[got["stage"]].param_bytes, got["bytes"]["params"])
        _close(est[got["stage"]].optimizer_bytes, got["bytes"]["optimizer"])


@pytest.mark.parametrize("name", ["vanilla", "recursive", "mor", "mor_kvshare"])
def test_plan_activations_match_one_process(name):
    """Activation estimate against the bytes autograd saves in a real forward (one process).
    Token-choice is left out: its depths are learned, the plan assumes balanced ones."""
    from mor_dist.parallel.activation_bytes import SavedActivationBytes
    from tests.parallel.common import model_for, step_batches

    cfg = config(name)
    model = model_for(cfg).train()
    tokens, targets = step_batches(cfg, 0)[0]
    with SavedActivationBytes(model) as saved:
        model(tokens, targets)
    est, _ = estimate(cfg, gpus=1)
    _close(est[0].activation_bytes, saved.bytes)


@pytest.mark.parametrize("case", [c for c in TP_CASES if c[0] != "mor_token" and not any("checkpointing" in o for o in c[1])],
                         ids=lambda c: "-".join((c[0], *c[1])))
def test_plan_activations_match_tp2_runs(world2, case):
    est, _ = estimate(config(case[0], ["parallel.tensor=2", *case[1]]), gpus=2)
    for r in world2:
        _close(est[0].activation_bytes, r["tp_cases"][case]["activation_bytes"])


def test_plan_cli_fits_and_does_not(capsys):
    assert parse_bytes("80GiB") == 80 * 1024**3 and parse_bytes("40GB") == 40 * 10**9
    assert main(["plan", "configs/paper/1.7b/mor_nr3.yaml", "parallel.tensor=2", "--gpus", "8", "--gpu-mem", "80GiB"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["plan", "configs/paper/1.7b/mor_nr3.yaml", "--gpus", "1", "--gpu-mem", "4GiB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_plan_rejects_zero3_with_pipeline():
    from mor_dist.parallel.dims import ParallelLayoutError

    with pytest.raises((ParallelLayoutError, ValueError), match="zero_stage"):
        estimate(config("mor", ["parallel.pipeline=2", "parallel.zero_stage=3"]), gpus=2)


@pytest.mark.parametrize("case", [c for c in BF16_CASES if "parallel.zero_stage" in c[0]], ids=lambda c: c[0])
def test_plan_matches_bf16_runs(world2, case):
    """In bf16 (the dtype a GPU plan assumes): parameters, fp32-accumulated gradients and the
    optimizer's fp32 state, within 10% of the bytes measured under ZeRO-2 and ZeRO-3 at DP=2."""
    est, _ = estimate(config("mor", ["train.dtype=bf16", *case]), gpus=2)
    for r in world2:
        got = r["bf16_cases"][case]["bytes"]
        for key, value in (("params", est[0].param_bytes), ("grads", est[0].grad_bytes),
                           ("optimizer", est[0].optimizer_bytes)):
            assert value == pytest.approx(got[key], rel=0.10), (key, value, got[key])


@pytest.mark.parametrize("name", ["mor", "recursive"])
def test_plan_activations_match_one_process_bf16(name):
    """bf16 activations, with RMSNorm's and RoPE's fp32 copies counted at 4 bytes: within 10%."""
    import torch

    from mor_dist.parallel.activation_bytes import SavedActivationBytes
    from tests.parallel.common import model_for, step_batches

    cfg = config(name, ["train.dtype=bf16"])
    model = model_for(cfg).to(torch.bfloat16).train()
    tokens, targets = step_batches(cfg, 0)[0]
    with SavedActivationBytes(model) as saved:
        model(tokens, targets)
    est, _ = estimate(cfg, gpus=1)
    assert est[0].activation_bytes == pytest.approx(saved.bytes, rel=0.10)
