"""FLOPs- and token-budgeted runs: train.flops_budget / train.tokens -> train.steps."""

from __future__ import annotations

import json

import pytest

from mor_dist.cli import main
from mor_dist.config import ConfigError, load_config
from mor_dist.model.accounting import train_flops_per_token
from mor_dist.training.schedule import lr_multiplier
from tests.hf.conftest import RUN_TOKENS, tiny_dataset, trained_run  # noqa: F401  (the fixtures)
from tests.training.conftest import tb_scalars

# The paper's Table 3 step counts at 16.5e18 FLOPs (360m; global batch 1024 x 2048 tokens).
PAPER_STEPS = {"vanilla": 9438, "mor_nr2": 12619, "mor_nr3": 14161, "mor_nr4": 14216}


def test_360m_isoflop_steps_relative_to_vanilla_match_the_paper():
    steps = {k: load_config(f"configs/paper/360m/{k}.yaml", ["train.flops_budget=16.5e18"]).train.steps
             for k in PAPER_STEPS}
    for k in ("mor_nr2", "mor_nr3", "mor_nr4"):
        ours, paper = steps[k] / steps["vanilla"], PAPER_STEPS[k] / PAPER_STEPS["vanilla"]
        assert ours == pytest.approx(paper, rel=0.01), (k, ours, paper)


def test_a_budget_buys_the_whole_steps_that_fit():
    cfg = load_config("configs/paper/360m/mor_nr3.yaml", ["train.flops_budget=16.5e18"])
    step_flops = train_flops_per_token(cfg) * 1024 * 2048
    assert cfg.train.steps * step_flops <= 16.5e18 < (cfg.train.steps + 1) * step_flops
    cfg = load_config("configs/paper/360m/vanilla.yaml", ["train.tokens=20e9"])
    assert cfg.train.steps == int(20e9 // (1024 * 2048))  # a budget replaces train.steps
    # Both on the command line: which one was meant is not guessed (the budget silently won).
    with pytest.raises(ConfigError, match=r"^train\.steps: given, but train\.tokens is set too"):
        load_config("configs/paper/360m/vanilla.yaml", ["train.tokens=20e9", "train.steps=5"])
    assert load_config("configs/paper/360m/vanilla.yaml", ["train.tokens=null", "train.steps=5"]).train.steps == 5


def test_mor_info_prints_the_steps_and_tokens_a_budget_gives(capsys):
    assert main(["info", "configs/paper/360m/mor_nr2.yaml", "train.flops_budget=16.5e18"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert run["set_by"] == "train.flops_budget"
    assert run["tokens"] == run["steps"] * run["tokens_per_step"] and run["train_flops"] <= 16.5e18


@pytest.mark.parametrize("overrides, key", [
    (["train.flops_budget=1e15", "train.tokens=1e9"], "train.tokens"),
    (["train.flops_budget=1e6"], "train.flops_budget"),  # less than one step
    (["train.tokens=1000"], "train.tokens"),
    (["train.flops_budget=0"], "train.flops_budget"),
    (["train.tokens=-3"], "train.tokens"),
])
def test_impossible_budgets_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config("configs/paper/360m/vanilla.yaml", overrides)


def test_a_token_budget_sets_the_runs_length_and_its_schedule(trained_run):  # noqa: F811
    """`mor train` with train.tokens: the run stops after the steps the budget buys, and the wsd
    schedule (warmup, cooldown) is laid over those steps."""
    cfg = load_config(trained_run / "config.yaml")
    steps = RUN_TOKENS // (cfg.train.global_batch_size * cfg.data.seq_len)
    assert cfg.train.steps == steps == 5 and (trained_run / "checkpoints" / "step_00000005").is_dir()
    lr = tb_scalars(trained_run)["train/lr"]
    assert sorted(lr) == list(range(1, steps + 1))
    for s, value in lr.items():
        assert value == pytest.approx(cfg.optim.lr * lr_multiplier(s - 1, steps, cfg.schedule))
    assert lr[1] < lr[2] == lr[4] > lr[5]  # warmup, stable, cooldown
