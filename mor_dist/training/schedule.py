"""Learning-rate schedules as a multiplier of optim.lr at an optimizer step."""

from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, sched) -> float:
    """wsd: linear warmup, constant, linear cooldown over the last decay_fraction (the paper's
    trapezoid); cosine: warmup then cosine to min_lr_ratio; constant: warmup then flat."""
    warmup = int(sched.warmup_fraction * total)
    floor = sched.min_lr_ratio
    if warmup and step < warmup:
        return (step + 1) / warmup
    if sched.name == "constant":
        return 1.0
    if sched.name == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay = int(sched.decay_fraction * total)
    start = total - decay
    if decay and step >= start:
        return floor + (1 - floor) * max(0.0, (total - step) / decay)
    return 1.0
