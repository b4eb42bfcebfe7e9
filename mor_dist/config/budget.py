"""A run's length from a budget: train.flops_budget or train.tokens -> train.steps.

One optimizer step costs global_batch_size x data.seq_len tokens, each train_flops_per_token in the
paper's accounting (model/accounting.py). A budget buys the whole steps that fit in it (never more
than the budget); the schedule's warmup and cooldown are fractions of those steps, so they follow.
"""

from __future__ import annotations

from mor_dist.config.validate import ConfigError


def tokens_per_step(cfg) -> int:
    return cfg.train.global_batch_size * cfg.data.seq_len


def budget_steps(cfg) -> int | None:
    """The steps train.flops_budget or train.tokens buys; None when neither is set."""
    t, per_step = cfg.train, tokens_per_step(cfg)
    if t.flops_budget is not None:
        from mor_dist.model.accounting import train_flops_per_token  # torch: only when needed


        step_flops = train_flops_per_token(cfg) * per_step
        steps = int(t.flops_budget // step_flops)
        if steps < 1:
            raise ConfigError(
                f"train.flops_budget: {t.flops_budget:.4g} buys no optimizer step (one costs {step_flops:.4g} "
                f"FLOPs: {per_step} tokens x {train_flops_per_token(cfg):.4g}); raise it or shrink the batch"
            )
        return steps
    if t.tokens is not None:
        if t.tokens < per_step:
            raise ConfigError(
                f"train.tokens: {t.tokens:.4g} is less than one optimizer step ({per_step} tokens: "
                "train.global_batch_size x data.seq_len); raise it or shrink the batch"
            )
        return int(t.tokens // per_step)
    return None


def apply_budget(cfg) -> None:
    """Sets train.steps from the budget, if one is set (called when a config is loaded)."""
    steps = budget_steps(cfg)
    if steps is not None:
        cfg.train.steps = steps
