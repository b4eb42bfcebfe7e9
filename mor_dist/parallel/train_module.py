"""The train module: model + parallelism + optimizer (DeepSpeed ZeRO), one optimizer step at a time.
The trainer (mor_dist/training/trainer.py) calls only this object's methods:

    module = build_train_module(model, cfg, dims)     # parallelizes model in place
    module.train_step(micro_batches, lr) -> dict       # loss, lm_loss, aux/*, stats/*, grad_norm, skipped
    module.eval_step(tokens, targets) -> (loss, depth) # causal routing
    module.save(folder) / module.load(folder)          # DeepSpeed's sharded checkpoint
    module.model, module.engine, module.dims

One process is a 1-rank world, so single-process and multi-node runs share the engine, the sharded
checkpoint format and the resume path. Pipeline layouts (parallel.pipeline > 1) get the
PipelineTrainModule of pipeline.py, which keeps the same contract.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist

from mor_dist.parallel.engine import (
    MegatronMpu, adamw, deepspeed_config, import_deepspeed, load_engine, rank_bytes, save_engine,
)
from mor_dist.parallel.dims import comm_device
from mor_dist.parallel.parallelize import parallelize


class TrainModule:
    def __init__(self, model, cfg, dims, load_universal: bool = False):
        deepspeed = import_deepspeed()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.model, self.cfg, self.dims = model, cfg, dims
        parallelize(model, cfg, dims)
        self.dp_group = None
        mpu = None
        if dims.tp > 1:
            mpu = MegatronMpu()
            self.dp_group = mpu.get_data_parallel_group()
        # DeepSpeed keeps the last mpu in a module global; a new layout in this process must replace it.
        deepspeed.utils.groups.mpu = mpu
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=adamw(model, cfg.optim), mpu=mpu,
            config=deepspeed_config(cfg, dims, load_universal),
        )
        self.measure_bytes = False  # tests and the planner's check set this: fills last_rank_bytes
        self.last_rank_bytes: dict[str, int] = {}

    # ------------------------------------------------------------------ steps
    def train_step(self, micro_batches, lr: float) -> dict:
        """Forward/backward over the micro-batches, then one optimizer step at lr.

        A non-finite loss on any rank (with train.nan_policy=skip) skips the update: the rest of the
        step backpropagates NaN, which the optimizer's own overflow check turns into no step at all
        (parameters, moments and step counts untouched, gradients cleared); a plain torch optimizer
        (ZeRO stage 0, fp32) has no such check and is held back here. The trainer counts the step.
        """
        self.engine.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        bad = False
        peak = 0
        device = self.engine.device
        for i, (tokens, targets) in enumerate(micro_batches):
            out = self.engine(tokens.to(device), targets.to(device))
            if self.cfg.train.nan_policy == "skip":
                finite = torch.tensor([1.0 if torch.isfinite(out.loss).item() else 0.0], device=comm_device())
                if dist.get_world_size() > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                bad = bad or finite.item() == 0.0
            loss = out.loss
            if bad:
                loss = torch.stack([p.sum() for p in self.model.parameters() if p.requires_grad]).sum() * math.nan
            self.engine.backward(loss)
            if self.measure_bytes:
                peak = max(peak, grad_bytes(self.engine))
            if bad and i == len(micro_batches) - 1:
                with _held_back(self.engine.optimizer):
                    self.engine.step()
            else:
                self.engine.step()
            _accumulate(sums, out)
        if self.measure_bytes:
            self.last_rank_bytes = {**rank_bytes(self.engine), "grads": peak}
        n = len(micro_batches)
        metrics = self._mean_over_dp({k: v / n for k, v in sums.items()})
        if bad:
            metrics["loss"] = math.nan
            self.model.discard_step()
            metrics["grad_norm"] = None
        else:
            self._after_step()
            norm = self.engine.get_global_grad_norm()
            metrics["grad_norm"] = float(norm) if norm is not None else None
        metrics["skipped"] = bad
        return metrics

    def _after_step(self) -> None:
        buffers = self.model.load_buffers()
        if buffers and self.dims.dp > 1:
            for b in buffers:
                dist.all_reduce(b, group=self.dp_group)  # TP ranks saw the same tokens: DP only
        self.model.after_optimizer_step()

    def _mean_over_dp(self, metrics: dict) -> dict:
        if self.dims.dp == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=comm_device())
        dist.all_reduce(t, group=self.dp_group)
        return {k: v / self.dims.dp for k, v in zip(keys, t.tolist())}

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
        save_engine(self.engine, folder)

    def load(self, folder: Path) -> None:
        load_engine(self.engine, folder)


@contextlib.contextmanager
def _held_back(optimizer):
    """A plain torch optimizer (no overflow check of its own) does not step inside the block, and
    tells DeepSpeed's engine so (it counts a skipped step); ZeRO / bf16 optimizers skip by themselves
    on the NaN gradients."""
    if hasattr(optimizer, "overflow"):
        yield
        return
    optimizer.step = lambda *args, **kwargs: None
    optimizer.overflow = True
    try:
        yield
    finally:
        del optimizer.step, optimizer.overflow


def grad_bytes(engine) -> int:
    """Gradient bytes held right after a backward: the parameters' .grad (accumulating between
    optimizer steps, freed by ZeRO-2/3 hooks) plus ZeRO's reduced partitions."""
    opt, stage = engine.optimizer, engine.zero_optimization_stage()
    held = sum(p.grad.numel() * p.grad.element_size() for p in engine.module.parameters() if p.grad is not None)
    if stage == 3:
        held += opt.grad_partitions_flat_buffer.numel() * opt.grad_partitions_flat_buffer.element_size()
    elif stage in (1, 2):
        held += sum(g.numel() * g.element_size() for gs in opt.averaged_gradients.values() if gs for g in gs)
    return held


def _accumulate(sums: dict, out) -> None:
    def add(key, value):
        sums[key] = sums.get(key, 0.0) + float(value)

    add("loss", out.loss.detach())
    add("lm_loss", out.lm_loss.detach())
    for name, value in out.aux.items():
        add(f"aux/{name}", value.detach())
    for name, value in out.stats.items():
        add(f"stats/{name}", value)


def build_train_module(model, cfg, dims, load_universal: bool = False):
    if dims.pp > 1:
        from mor_dist.parallel.pipeline import PipelineTrainModule

        return PipelineTrainModule(model, cfg, dims, load_universal)
    return TrainModule(model, cfg, dims, load_universal)
