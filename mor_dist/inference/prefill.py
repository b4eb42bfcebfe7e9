"""Prompt chunks through the model into the paged caches, with no device-to-host sync.

A chunk is n sequences x t tokens (padding marked by `valid`), at their original positions, appended
to the cache rows of their requests. The recursions follow MoRModel's causal decisions (MOR.md 3, 4):
- expert-choice: before step r, router r decides for every token still recursing (logit > 0, or the
  aux router's); a token that stops never comes back; the selected get x + alpha*sigmoid(logit)*f(x);
- token-choice: depth = argmax of the router on the first unique layer's output; the token leaves
  with h1 + g * f^depth(h1);
- recursive: every token, every step.
Instead of gathering the tokens that go on (which needs their count on the host), every step runs
the whole chunk and masks: tokens that stopped neither write K/V nor change. The unique last layers
run too (they fill their cache); the head does not -- a prompt's last token is decoded by the engine.

The engine's decode tick (engine.py) makes the same decisions one token at a time; both are checked
against one full causal-mode forward (tests/inference/test_engine.py).
"""

from __future__ import annotations

import torch

from mor_dist.model.layers import TokenFrame


def token_choice_depths(model, h: torch.Tensor):
    """Token-choice: (assigned depth 1..Nr, gate (..., 1)) from the first unique layer's output."""
    router = model.token_router
    _, probs = router.probs(h)
    scores = probs + router.bias if model.routing.balancing == "loss_free" else probs
    choice = scores.argmax(dim=-1)
    return choice + 1, probs.gather(-1, choice.unsqueeze(-1))


def expert_gate(model, x, out, logits):
    """Expert-choice update of the selected tokens: x + alpha * sigmoid(logit) * f(x)."""
    if model.routing.gating == "weighted":
        return x + (model.alpha * torch.sigmoid(logits)).unsqueeze(-1).to(x.dtype) * out
    return out


def run_unique(model, layers, views, h, pos, valid):
    frame = TokenFrame(pos, valid, cache=views)
    for i, layer in enumerate(layers):
        h = layer(h, frame, i)
    return h


@torch.no_grad()
def prefill_chunk(model, cache, rows: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor,
                  valid: torch.Tensor, widths: dict) -> torch.Tensor:
    """Run a chunk into the caches of `rows` (n,); returns each token's recursion depth (n, t).

    widths: pages to read per group ("prefix", "suffix", "shared"), from the host's reservations."""
    nr = model.layout.recursions
    h = model.embed(tokens)
    if model.prefix:
        h = run_unique(model, model.prefix, cache.prefix.views(rows, pos, valid, widths["prefix"]), h, pos, valid)
    depth = torch.zeros_like(tokens)

    def step(r, x, active):
        srows = cache.shared_rows(rows, r)
        write = active if cache.kv == "recursion_wise" or r == 0 else None
        views = cache.shared.views(srows, pos, write, widths["shared"], writes=write is not None)
        return model._run_block(r, x, TokenFrame(pos, active, cache=views))

    if model.token_router is not None:
        assigned, gate = token_choice_depths(model, h)
        run = h
        for r in range(nr):
            active = valid & (assigned > r)
            run = torch.where(active.unsqueeze(-1), step(r, run, active), run)
            depth = depth + active.long()
        h = h + gate.to(h.dtype) * run
    elif model.routers:
        active = valid
        for r in range(nr):
            router = model.routers[r]
            logits = router(h)
            active = active & (router.causal_logits(h, logits) > 0)
            new = expert_gate(model, h, step(r, h, active), logits)
            h = torch.where(active.unsqueeze(-1), new, h)
            depth = depth + active.long()
    else:
        for r in range(nr):
            h = torch.where(valid.unsqueeze(-1), step(r, h, valid), h)
            depth = depth + valid.long()
    if model.suffix:
        run_unique(model, model.suffix, cache.suffix.views(rows, pos, valid, widths["suffix"]), h, pos, valid)
    return depth
