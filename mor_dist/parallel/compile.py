"""train.compile: torch.compile the model's forward where the layout allows it.

Compiled: one process or data parallelism with ZeRO stage 0-2 -- the whole training forward and its
backward (expert-choice, vanilla and recursive models are one graph; token-choice breaks the graph
once per recursion, where the tokens a step runs are counted). Left eager, with a warning: tensor
parallelism (megatron-core's custom autograd functions and this package's CPU shim for them),
pipeline stages (DeepSpeed's schedule runs the stage modules itself) and ZeRO-3 (its parameter
gather hooks fire inside the forward).

A routing warmup (capacity for expert-choice, max depth for token-choice) runs eager: its schedule
changes the top-k size or the branch taken with the step, and a compiled forward would recompile
every step until torch's recompile limit left it eager for good. Compiled from the step it ends.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("mor.train")


def compile_blockers(cfg, dims) -> list[str]:
    """Why this layout is not compiled (empty: it is)."""
    why = []
    if dims.tp > 1:
        why.append("tensor parallelism")
    if dims.pp > 1:
        why.append("pipeline stages")
    if cfg.parallel.zero_stage >= 3:
        why.append("ZeRO-3")
    return why


def apply_compile(model, cfg, dims, backend: str = "inductor") -> bool:
    """Replace model.forward by its compiled version; False (and a warning) where not allowed.
    backend: torch.compile's (tests trace with "aot_eager", which skips code generation)."""
    blockers = compile_blockers(cfg, dims)
    if blockers:
        if dims.rank == 0:
            log.warning("train.compile: not compiling with %s; the model runs eager", " and ".join(blockers))
        return False
    eager, compiled = model.forward, torch.compile(model.forward, backend=backend)

    def forward(*args, **kwargs):
        return (eager if model.in_warmup else compiled)(*args, **kwargs)

    model.forward = forward
    if model.in_warmup and dims.rank == 0:
        log.info("train.compile: the routing warmup (%d steps) runs eager, compiled after it", model.warmup_steps)
    return True
