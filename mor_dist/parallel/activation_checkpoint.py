"""Activation checkpointing for MoR, applied from outside the model.

parallel.activation_checkpointing:
  recursion: each recursion step's pass through the shared block is one checkpoint region (its
             activations are recomputed in backward); the router and the gather/scatter stay outside.
  full:      also each unique first/last layer.
Non-reentrant torch.utils.checkpoint: it accepts the TokenFrame argument as it is and keeps the
recursion-1 K/V that recursive KV sharing stores as a side output differentiable.
"""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint


def _checkpointed(fn):
    @functools.wraps(fn)
    def run(*args):
        return checkpoint(fn, *args, use_reentrant=False)

    return run


def apply_activation_checkpointing(model, mode: str) -> None:
    if mode == "none":
        return
    if mode not in ("recursion", "full"):
        raise ValueError(f"parallel.activation_checkpointing={mode!r} is not one of none, recursion, full")
    # The model calls self._run_block(r, x, frame) once per recursion step: shadow it on the instance.
    model._run_block = _checkpointed(model._run_block)
    if mode == "full":
        for layer in (*model.prefix, *model.suffix):
            layer.forward = _checkpointed(layer.forward)
