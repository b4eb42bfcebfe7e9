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

import math
from pathlib import Path

import torch
import torch.distributed as dist

from mor_dist.parallel.engine import (
    MegatronMpu, adamw, deepspeed_config, guard_nonfinite, import_deepspeed, load_engine, rank_bytes, save_engine,
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
        self.guard = guard_nonfinite(self.engine)
        self.measure_bytes = False  # tests and the planner's check set this: fills last_rank_bytes
        self.last_rank_bytes: dict[str, int] = {}

    # ------------------------------------------------------------------ steps
    def train_step(self, micro_batches, lr: float, detail: bool = False) -> dict:
        """Forward/backward over the micro-batches, then one optimizer step at lr.

        A step whose gradients are not all finite is not applied: DeepSpeed's ZeRO and bf16
        optimizers check and skip by themselves (`overflow`), torch's AdamW at ZeRO stage 0 is
        guarded (engine.NonFiniteGuard); parameters, moments and step counts stay as they were. A
        non-finite loss on any rank (with train.nan_policy=skip) makes the rest of the step
        backpropagate NaN, so it is skipped the same way. `skipped` says so; the trainer decides
        whether the run goes on (train.nan_policy).
        """
        self.engine.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}  # on the device: read once, at the end of the step
        bad = False
        peak = 0
        device = self.engine.device
        for i, (tokens, targets) in enumerate(micro_batches):
            out = self.engine(tokens.to(device), targets.to(device))
            if self.cfg.train.nan_policy == "skip":
                # Skipping decides per micro-batch on the host (the rest of the step is poisoned): a
                # sync per micro-batch, paid only with nan_policy=skip.
                finite = torch.isfinite(out.loss.detach()).float().reshape(1).to(comm_device())
                if dist.get_world_size() > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                bad = bad or finite.item() == 0.0
            loss = out.loss
            if bad:
                loss = torch.stack([p.sum() for p in self.model.parameters() if p.requires_grad]).sum() * math.nan
            self.engine.backward(loss)
            if self.measure_bytes:
                peak = max(peak, grad_bytes(self.engine))
            last = i == len(micro_batches) - 1
            if detail and last and not bad:
                group_norms = self._group_grad_norms()  # after the last backward, before the step
            self.engine.step()
            _accumulate(sums, out)
        if self.measure_bytes:
            self.last_rank_bytes = {**rank_bytes(self.engine), "grads": peak}
        # DeepSpeed's optimizers set `overflow` on the host (they synced to decide); the guard's flag
        # is a device tensor that rides in the step's one host copy.
        overflow = bool(getattr(self.engine.optimizer, "overflow", False))
        if self.guard is not None and self.guard.found is not None:
            sums["nonfinite_grads"] = self.guard.found.to(sums["loss"].device) * len(micro_batches)
        norm = None if bad else self.engine.get_global_grad_norm()
        if detail and not bad:
            sums.update({k: v * len(micro_batches) for k, v in group_norms.items()})  # _to_host divides by n
        metrics = self._to_host(sums, len(micro_batches), norm)
        skipped = bad or overflow or metrics.pop("nonfinite_grads", 0.0) > 0
        if skipped:
            self.model.discard_step()
        else:
            self._after_step()
        if bad:
            metrics["loss"] = math.nan
        metrics["skipped"] = skipped
        return metrics

    def _group_grad_norms(self) -> dict:
        """Gradient norm (before clipping) of each router and of the shared block, for logging
        steps: DeepSpeed gathers each parameter's full gradient whatever the ZeRO stage (a collective
        per parameter, hence not every step). Tensor-parallel shards are summed over the TP group,
        replicated parameters counted once. Divided over DP ranks later: pre-scaled here."""
        from deepspeed.utils import safe_get_full_grad

        model = self.model
        groups = {f"grad_norm/router_r{r + 1}": m for r, m in enumerate(model.routers)}
        if model.token_router is not None:
            groups["grad_norm/token_router"] = model.token_router
        groups["grad_norm/shared_block"] = model.shared
        out = {}
        device = comm_device()
        for name, module in groups.items():
            split = torch.zeros((), dtype=torch.float64, device=device)
            whole = torch.zeros((), dtype=torch.float64, device=device)
            for p in module.parameters():
                g = safe_get_full_grad(p)
                if g is None:
                    continue
                sq = g.detach().double().pow(2).sum().to(device)
                if getattr(p, "tensor_model_parallel", False):
                    split = split + sq
                else:
                    whole = whole + sq
            if self.dims.tp > 1:
                from megatron.core import parallel_state as ps

                dist.all_reduce(split, group=ps.get_tensor_model_parallel_group())
            # _to_host averages over the DP ranks, which hold the same full gradient: keep it as is.
            out[name] = (split + whole).sqrt()
        return out

    def _to_host(self, sums: dict, n: int, norm) -> dict:
        """The step's metrics, averaged over micro-batches and data-parallel ranks, in ONE
        device-to-host copy (with the gradient norm): the step's only sync on the default path."""
        keys = sorted(sums)
        values = [sums[k].float().reshape(1) / n for k in keys]
        if norm is not None:
            keys.append("grad_norm")
            values.append(torch.as_tensor(norm, dtype=torch.float32, device=values[0].device).reshape(1))
        packed = torch.cat(values).to(torch.float64)
        if self.dims.dp > 1:
            packed = packed.to(comm_device())
            dist.all_reduce(packed, group=self.dp_group)
            packed = packed / self.dims.dp
            if norm is not None:
                packed[-1] = packed[-1] * self.dims.dp  # the norm is global already, not a per-rank value
        metrics = dict(zip(keys, packed.tolist()))
        metrics.setdefault("grad_norm", None)
        return metrics

    def _after_step(self) -> None:
        buffers = self.model.load_buffers()
        if buffers and self.dims.dp > 1:
            for b in buffers:
                dist.all_reduce(b, group=self.dp_group)  # TP ranks saw the same tokens: DP only
        self.model.after_optimizer_step()

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
        self.model._sync_host_step()


def grad_bytes(engine) -> int:
    """Gradient bytes held right after a backward: the parameters' .grad (accumulating between
    optimizer steps, freed by ZeRO-2/3 hooks) plus ZeRO's reduced partitions."""
    opt, stage = engine.optimizer, engine.zero_optimization_stage()
    held = sum(p.grad.numel() * p.grad.element_size() for p in engine.module.parameters() if p.grad is not None)
    if hasattr(opt, "fp32_groups_gradients_flat"):  # bf16 + ZeRO-1: fp32 gradient accumulation buffers
        held += sum(g.numel() * g.element_size() for g in opt.fp32_groups_gradients_flat)
    elif stage == 3:
        held += opt.grad_partitions_flat_buffer.numel() * opt.grad_partitions_flat_buffer.element_size()
    elif stage in (1, 2):
        held += sum(g.numel() * g.element_size() for gs in opt.averaged_gradients.values() if gs for g in gs)
    return held


def _accumulate(sums: dict, out) -> None:
    """Add a micro-batch's loss, aux losses and routing stats to the step's sums, on the device."""

    device = out.loss.device

    def add(key, value):  # on the loss's device: one torch.cat of every sum for the host copy
        value = torch.as_tensor(value, device=device).detach()
        sums[key] = sums[key] + value if key in sums else value

    add("loss", out.loss)
    add("lm_loss", out.lm_loss)
    for name, value in out.aux.items():
        add(f"aux/{name}", value)
    for name, value in out.stats.items():
        add(f"stats/{name}", value)


def build_train_module(model, cfg, dims, load_universal: bool = False):
    if dims.pp > 1:
        from mor_dist.parallel.pipeline import PipelineTrainModule

        return PipelineTrainModule(model, cfg, dims, load_universal)
    return TrainModule(model, cfg, dims, load_universal)
