"""The train module: model + optimizer + data parallelism (DeepSpeed ZeRO), one optimizer step at a
time. The trainer (mor_dist/training/trainer.py) calls only this object's methods.

One process is a 1-rank world, so single-process and multi-node runs share the engine, the sharded
checkpoint format and the resume path.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("mor.train")


def _import_deepspeed():
    import deepspeed

    if not torch.cuda.is_available():
        # Skip DeepSpeed's C++ op builds on CPU (~50 s each): fp32 torch AdamW needs none of them.
        deepspeed.ops.__compatible_ops__ = {}
    return deepspeed


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, gains and router biases are left alone."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg, dims, load_universal: bool = False) -> dict:
    t = cfg.train
    accum = t.global_batch_size // (t.micro_batch_size * dims.dp)
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and torch.cuda.is_available())
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        # DeepSpeed 0.19 clips at 1.0 unless told: always say it.
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": int(cfg.parallel.zero_stage)},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


class TrainModule:
    def __init__(self, model, cfg, dims, load_universal: bool = False):
        if dims.tp > 1 or dims.pp > 1:
            raise NotImplementedError(
                f"parallel.tensor={dims.tp} / parallel.pipeline={dims.pp}: this train module drives data "
                "parallelism only"
            )
        deepspeed = _import_deepspeed()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.model, self.cfg, self.dims = model, cfg, dims
        o = cfg.optim
        optimizer = torch.optim.AdamW(
            param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, dims, load_universal)
        )

    # ------------------------------------------------------------------ steps
    def train_step(self, micro_batches, lr: float) -> dict:
        """Forward/backward over the micro-batches, then one optimizer step at lr.

        A non-finite loss on any rank (with train.nan_policy=skip) turns the rest of the step into
        zero-loss backward passes at lr 0: the weights do not move (AdamW with lr 0 leaves them as they
        are, weight decay included); the trainer counts the step as skipped.
        """
        self.engine.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        bad = False
        device = self.engine.device
        for tokens, targets in micro_batches:
            out = self.engine(tokens.to(device), targets.to(device))
            finite = torch.tensor([1.0 if torch.isfinite(out.loss).item() else 0.0])
            if dist.get_world_size() > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            bad = bad or finite.item() == 0.0
            if bad:
                for group in self.optimizer.param_groups:
                    group["lr"] = 0.0
                loss = sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad)
            else:
                loss = out.loss
            self.engine.backward(loss)
            self.engine.step()
            _accumulate(sums, out)
        n = len(micro_batches)
        metrics = {k: v / n for k, v in sums.items()}
        metrics = self._mean_over_dp(metrics)
        if bad:
            metrics["loss"] = math.nan
        self._after_step()
        norm = self.engine.get_global_grad_norm()
        metrics["grad_norm"] = float(norm) if norm is not None else None
        metrics["skipped"] = bad
        return metrics

    def _after_step(self) -> None:
        buffers = self.model.load_buffers()
        if buffers and dist.get_world_size() > 1:
            for b in buffers:
                dist.all_reduce(b)  # data parallel only: the world is the data-parallel group
        self.model.after_optimizer_step()

    def _mean_over_dp(self, metrics: dict) -> dict:
        if dist.get_world_size() == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}

    @torch.no_grad()
    def eval_step(self, tokens, targets):
        """Validation NLL with causal routing (the decisions inference makes)."""
        self.model.eval()
        device = self.engine.device
        out = self.model(tokens.to(device), targets.to(device), mode="causal")
        self.model.train()
        return out.lm_loss.item(), out.depth.cpu()

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: Path) -> None:
        # universal_checkpoint_info lets ds_to_universal reshard ZeRO-1/2 saves to another DP size.
        self.engine.save_checkpoint(
            str(folder.parent), tag=folder.name, client_state={"universal_checkpoint_info": {}}, save_latest=False
        )

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")


def _accumulate(sums: dict, out) -> None:
    def add(key, value):
        sums[key] = sums.get(key, 0.0) + float(value)

    add("loss", out.loss.detach())
    add("lm_loss", out.lm_loss.detach())
    for name, value in out.aux.items():
        add(f"aux/{name}", value.detach())
    for name, value in out.stats.items():
        add(f"stats/{name}", value)


def build_train_module(model, cfg, dims, load_universal: bool = False) -> TrainModule:
    return TrainModule(model, cfg, dims, load_universal)
