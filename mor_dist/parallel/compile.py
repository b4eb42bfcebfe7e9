"""train.compile: torch.compile the model's forward where the layout allows it.

Compiled: one process or data parallelism with ZeRO stage 0-2 -- the whole training forward and its
backward (expert-choice, vanilla and recursive models are one graph; token-choice breaks the graph
once per recursion, where the tokens a step runs are counted). Left eager, with a warning: tensor
parallelism (megatron-core's custom autograd functions and this package's CPU shim for them),
pipeline stages (DeepSpeed's schedule runs the stage modules itself) and ZeRO-3 (its parameter
gather hooks fire inside the forward).
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


def apply_compile(model, cfg, dims) -> bool:
    """Replace model.forward by its compiled version; False (and a warning) where not allowed."""
    blockers = compile_blockers(cfg, dims)
    if blockers:
        if dims.rank == 0:
            log.warning("train.compile: not compiling with %s; the model runs eager", " and ".join(blockers))
        return False
    model.forward = torch.compile(model.forward)
    return True
