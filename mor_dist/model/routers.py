"""MoR routers: expert-choice (one per recursion step) and token-choice (one, applied once).

The routers only score tokens; the model's recursion step (model/mor.py) gathers, runs the shared
block and scatters. State that must survive a resume (loss-free bias, pending loads) lives in buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def router_net(d_model: int, out_dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_model, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(d_model, 2 * d_model, bias=False), nn.GELU(), nn.Linear(2 * d_model, out_dim, bias=False)
        )
    raise ValueError(f"routing.router={kind!r} is not one of ('linear', 'mlp')")


class ExpertChoiceRouter(nn.Module):
    """Scores a recursion step's candidates; top-k of the scores go one step deeper.

    With causal_method=aux_router a second net, trained on detached inputs, makes the causal
    (inference) decision; otherwise the main logit does, trained by the BCE aux loss.
    """

    def __init__(self, d_model: int, kind: str, aux_router: bool):
        super().__init__()
        self.net = router_net(d_model, 1, kind)
        self.aux_net = router_net(d_model, 1, kind) if aux_router else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)

    def causal_logits(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Logit whose sign is the causal continue/exit decision (sigmoid > 0.5 <=> logit > 0)."""
        return logits if self.aux_net is None else self.aux_net(h.detach()).squeeze(-1)


def topk_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k best scores per row, ascending, so selected tokens keep their order."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def compact(keep: torch.Tensor, min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slots of the kept entries of each row, in order, padded to the row maximum (and to at least
    min_width slots, all padding when nothing is kept).

    Returns (order (B, K), valid (B, K) or None when no row needed padding). Padding slots point at
    distinct dropped entries, so a scatter through them never collides with a kept one.

    Two device-to-host syncs, inherent to a data-dependent shape: K (the most kept entries of a row)
    and whether any row needs padding. Only causal routing (evaluation) and token-choice call it;
    expert-choice training (top-k, k fixed by the capacity) never does.
    """
    k_max = max(int(keep.sum(dim=1).max()) if keep.numel() else 0, min(min_width, keep.shape[1]))
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k_max]
    valid = keep.gather(1, order)
    return order, (None if bool(valid.all()) else valid)


def capacity_at(c_r: float, step: int, warmup_steps: int) -> float:
    """Capacity warmup: cosine from 1.0 down to c_r over warmup_steps optimizer steps."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return c_r
    decay = 0.5 * (1.0 + math.cos(math.pi * step / warmup_steps))
    return c_r + (1.0 - c_r) * decay


class TokenChoiceRouter(nn.Module):
    """Assigns each token a depth 1..Nr once, from the first unique layer's output (top-1)."""

    def __init__(self, d_model: int, recursions: int, kind: str, func: str, alpha: float):
        super().__init__()
        if func not in ("softmax", "sigmoid"):
            raise ValueError(f"routing.token_func={func!r} is not one of ('softmax', 'sigmoid')")
        self.func, self.alpha, self.recursions = func, alpha, recursions
        self.net = router_net(d_model, recursions, kind)
        # Loss-free balancing: bias used for selection only, moved after each optimizer step.
        self.register_buffer("bias", torch.zeros(recursions))
        # Tokens assigned to each depth since the last optimizer step (all-reduced across DP ranks by
        # the trainer before the bias update).
        self.register_buffer("pending_load", torch.zeros(recursions))

    def _apply(self, fn, recurse=True):
        # Balancing statistics stay fp32 whatever dtype the model is cast to: bf16 can neither count
        # millions of tokens nor add 0.001 to a bias of 0.5. Device moves still apply.
        kept = {name: self._buffers[name] for name in ("bias", "pending_load")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype and not new.is_meta:
                self._buffers[name] = old.to(device=new.device)
        return self

    def probs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(h).float()
        p = torch.softmax(logits, dim=-1) if self.func == "softmax" else torch.sigmoid(logits)
        return logits, self.alpha * p

    def update_bias(self, rate: float) -> None:
        load = self.pending_load
        if load.sum() > 0:
            self.bias += rate * torch.sign(load.mean() - load)
        load.zero_()


def bce_topk_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Router aux loss: predict top-k membership from the logit, averaged over candidates."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())
