"""Shared pieces of the parallel tests: the tiny configs, deterministic batches, the single-process
reference (plain torch AdamW, no DeepSpeed), and helpers run inside the spawned ranks."""

from __future__ import annotations

import torch

from mor_dist.config import load_config
from mor_dist.model import build_model

STEPS = 5
SEQ = 32
GLOBAL_BATCH = 8
MICRO = 2
# Small clip so clipping is active in every step: the global norm over shards must be right.
BASE = ["data.seq_len=32", f"train.global_batch_size={GLOBAL_BATCH}", f"train.micro_batch_size={MICRO}",
        "optim.grad_clip=0.05", "train.dtype=fp32"]


def config(name: str, overrides=()):
    return load_config(f"configs/tiny/{name}.yaml", BASE + list(overrides))


def model_for(cfg):
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg)


def step_batches(cfg, step: int):
    """The global batch of optimizer step `step` as micro-batches of (tokens, targets)."""
    g = torch.Generator().manual_seed(1000 + step)
    # Tokens from a small sub-vocabulary repeat often, so the model learns within 5 steps.
    batch, size = cfg.train.global_batch_size, cfg.train.micro_batch_size
    seq = torch.randint(0, 64, (batch, SEQ + 1), generator=g)
    micro = [seq[i : i + size] for i in range(0, batch, size)]
    return [(m[:, :-1].contiguous(), m[:, 1:].contiguous()) for m in micro]


def rank_share(micro, dp: int, dp_rank: int):
    """This data-parallel rank's micro-batches of a global batch."""
    return micro[dp_rank::dp]


def reference_losses(cfg, steps: int = STEPS, model=None) -> list[float]:
    """Single-process training with the same data, loss scaling, clipping and AdamW."""
    from mor_dist.parallel.engine import adamw

    model = model_for(cfg) if model is None else model
    opt = adamw(model, cfg.optim)
    losses = []
    for s in range(steps):
        micro = step_batches(cfg, s)
        total = 0.0
        for tokens, targets in micro:
            out = model(tokens, targets)
            (out.loss / len(micro)).backward()
            total += out.loss.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step()  # one process: the load buffers already hold every micro-batch
        losses.append(total)
    return losses


def reference_grads(cfg, prefix: str = "shared.") -> dict[str, torch.Tensor]:
    """Gradients of the first micro-batch at initialization, for parameters under prefix."""
    model = model_for(cfg)
    tokens, targets = step_batches(cfg, 0)[0]
    model(tokens, targets).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def reference_eval(cfg, trained_steps: int = 0) -> tuple[float, torch.Tensor]:
    """Causal-mode (inference routing) loss and depths of the first micro-batch, at initialization or
    after `trained_steps` single-process steps."""
    model = model_for(cfg)
    if trained_steps:
        reference_losses(cfg, trained_steps, model)
    model.eval()
    tokens, targets = step_batches(cfg, 0)[0]
    with torch.no_grad():
        out = model(tokens, targets, mode="causal")
    return out.lm_loss.item(), out.depth


def train_losses(module, cfg, dims, steps: int = STEPS) -> list[float]:
    """Run the train module for `steps` steps (inside a rank); the mean loss of each step."""
    losses = []
    for s in range(steps):
        micro = rank_share(step_batches(cfg, s), dims.dp, dims.dp_rank)
        losses.append(module.train_step(micro, cfg.optim.lr)["loss"])
    return losses
