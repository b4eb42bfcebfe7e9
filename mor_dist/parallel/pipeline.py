"""Pipeline parallelism with DeepSpeed's PipelineEngine (route A of ../shared/docs/pipeline-probe.md).

Why DeepSpeed's engine and not megatron-core's schedules (docs/architecture.md says more): MoR hands a
tuple of tensors across a stage cut (hidden state, depth, expert-choice selection, token-choice state,
aux losses). DeepSpeed sends tuples as they are, sums tied-weight gradients across stages itself
(TiedLayerSpec) and checkpoints per layer; megatron's schedules send one tensor per cut and would
need all of it packed into channels, the tied all-reduce and the checkpoint written by hand.

DeepSpeed's TrainSchedule is 1F1B: after warm-up each stage alternates one forward, one backward.
Only ZeRO stage 0/1 combine with it (parallelize.check_layout rejects others before any group starts).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from mor_dist.parallel.engine import (
    adamw, deepspeed_config, guard_nonfinite, import_deepspeed, load_engine, rank_bytes, save_engine,
)
from mor_dist.parallel.dims import comm_device
from mor_dist.parallel.parallelize import check_layout, parallelize
from mor_dist.parallel.stages import FirstStage, LastStage, Recursions, TiedWeights, aux_names, stage_plan


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class MoRPipelineModule(PipelineModule):
        """PipelineModule with the stage cuts given (MoR's structure), not balanced by DeepSpeed."""

        def __init__(self, layers, parts, **kwargs):
            self._fixed_parts = parts
            super().__init__(layers=layers, partition_method="uniform", **kwargs)

        def _partition_layers(self, method="uniform"):
            self.parts = list(self._fixed_parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def get_tied_weights_and_groups(self):
            # DeepSpeed all-reduces a tied gradient only where it exists; a stage whose recursion
            # routed no token has none, and the stages' collectives would mismatch (a hang): use zeros.
            pairs = super().get_tied_weights_and_groups()
            for weight, _ in pairs:
                if weight.grad is None:
                    weight.grad = torch.zeros_like(weight)
            return pairs

    return MoRPipelineModule


def build_layers(model, plan: list[int], names: list[str]):
    """DeepSpeed layer list for the stage plan, and the layer index where each stage starts."""
    from deepspeed.pipe import TiedLayerSpec

    embed_attrs = ["module." + n for n, _ in model.embed.named_parameters()]
    shared_attrs = ["module." + n for n, _ in model.shared.named_parameters()]

    def tied_embed():
        return TiedLayerSpec("embed", TiedWeights, model.embed, tied_weight_attr=embed_attrs)

    layers, parts, start = [], [0], 0
    pp = len(plan)
    for s, n in enumerate(plan):
        if s == 0:
            layers += [tied_embed(), FirstStage(model, names)]
        if n:
            layers += [
                TiedLayerSpec("shared", TiedWeights, model.shared, tied_weight_attr=shared_attrs),
                Recursions(model, names, start, start + n),
            ]
            start += n
        if s == pp - 1:
            layers.append(LastStage(model, names))
            if model.head is None:  # tied head: the embedding's weight lives here too
                layers.append(tied_embed())
        parts.append(len(layers))
    return layers, parts


def _release_unowned(model, pipe) -> None:
    """Every rank built the whole model (same seed, so stages start identical); keep only this stage's
    weights. The others become empty tensors: module.model's state_dict is not a checkpoint under
    PP, DeepSpeed's per-layer files are."""
    owned = {id(p) for p in pipe.parameters()}
    for p in model.parameters():
        if id(p) not in owned:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


class PipelineTrainModule:
    """Same contract as train_module.TrainModule, for parallel.pipeline > 1."""

    def __init__(self, model, cfg, dims, load_universal: bool = False):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        check_layout(cfg)
        deepspeed = import_deepspeed()
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.model, self.cfg, self.dims = model, cfg, dims
        self.plan = stage_plan(cfg)
        accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp)
        if cfg.parallel.microbatches not in (0, accum):
            raise ValueError(
                f"parallel.microbatches={cfg.parallel.microbatches}: the pipeline runs one micro-batch per "
                f"gradient-accumulation step ({accum} = train.global_batch_size / (train.micro_batch_size x dp)); "
                "set 0 or change train.micro_batch_size"
            )
        self.names = aux_names(model, cfg.data.seq_len)  # before TP: the dry run needs no collectives
        parallelize(model, cfg, dims)
        layers, parts = build_layers(model, self.plan, self.names)
        topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
        self.records: dict[str, list[float]] = {}
        self.eval_out = None
        self.pipe = _pipeline_module_class()(layers, parts, topology=topo, loss_fn=self._loss)
        deepspeed.utils.groups.mpu = None  # the pipeline module's grid is the mpu here
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.pipe, optimizer=adamw(self.pipe, cfg.optim), config=deepspeed_config(cfg, dims, load_universal)
        )
        self.grid = self.engine.grid
        self.guard = guard_nonfinite(self.engine)  # ZeRO stage 0: torch's AdamW skips non-finite steps
        _release_unowned(model, self.pipe)
        self.measure_bytes = False
        self.last_rank_bytes: dict[str, int] = {}

    # ------------------------------------------------------------------ loss (last stage)
    def _loss(self, outputs, labels):
        logits, aux, depth = outputs
        lm = self.model.lm_loss(logits, labels)
        if not self.pipe.training:  # eval: causal routing adds no aux loss
            self.eval_out = (lm.detach(), depth)
            return lm
        # Not aux.sum(): its gradient is an expanded (stride-0) view, which DeepSpeed sends back to
        # the previous stage as it is, and gloo then reads memory past its one element.
        loss = lm + torch.dot(aux, torch.ones_like(aux))
        self._record("loss", loss.detach())
        self._record("lm_loss", lm.detach())
        for name, value in zip(self.names, aux.detach()):
            self._record(f"aux/{name}", value)
        return loss

    def _record(self, key, value):
        self.records.setdefault(key, []).append(float(value))

    # ------------------------------------------------------------------ steps
    def train_step(self, micro_batches, lr: float, detail: bool = False) -> dict:
        """The 1F1B schedule over the micro-batches, tied gradients summed across stages, one step.
        (detail: per-group gradient norms are not computed under pipelines: the schedule steps the
        optimizer itself, with no point between the last backward and the step.)"""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.records = {}
        for layer in self.pipe.forward_funcs:
            if hasattr(layer, "stats"):
                layer.stats = {}
        self.engine.train_batch(iter(micro_batches))
        if self.measure_bytes:
            self.last_rank_bytes = rank_bytes(self.engine)
        metrics = self._gather_metrics(len(micro_batches))
        # Non-finite gradients: the optimizer skipped the update (DeepSpeed's own check, or the
        # guard's at ZeRO stage 0, agreed over every stage); a non-finite loss is reported as such.
        flag = torch.tensor([float(getattr(self.engine.optimizer, "overflow", False))], device=comm_device())
        if self.guard is not None and self.guard.found is not None:
            flag = torch.maximum(flag, self.guard.found.reshape(1).to(flag.device))
        # Every rank must report the same step. DeepSpeed's check spans the stages (the grid's
        # model-parallel group), the guard's the world; this all-reduce keeps that true whichever
        # optimizer stepped, at one scalar (this path syncs for its metrics already).
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        skipped = bool(flag.item())
        if skipped:
            self.model.discard_step()
        else:
            self._after_step()
        norm = self.engine.get_global_grad_norm()
        metrics["grad_norm"] = float(norm) if norm is not None else None
        metrics["skipped"] = skipped
        return metrics

    def _gather_metrics(self, n: int) -> dict:
        """Loss and aux live on the last stage, routing stats on the stage that routed: merge over the
        world (every rank, so the trainer can log from rank 0), averaging the ranks that report."""
        local = {k: sum(v) / len(v) for k, v in self.records.items()}
        for layer in self.pipe.forward_funcs:
            for k, v in getattr(layer, "stats", {}).items():
                local[f"stats/{k}"] = v / n
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
        merged: dict[str, list[float]] = {}
        for d in everyone:
            for k, v in d.items():
                merged.setdefault(k, []).append(v)
        out = {k: sum(v) / len(v) for k, v in merged.items()}
        if not math.isfinite(out.get("loss", 0.0)):
            out["loss"] = math.nan
        return out

    def _after_step(self) -> None:
        buffers = self.model.load_buffers()
        if buffers and self.dims.dp > 1:
            for b in buffers:
                dist.all_reduce(b, group=self.grid.get_data_parallel_group())
        self.model.after_optimizer_step()

    @torch.no_grad()
    def eval_step(self, tokens, targets):
        """Validation NLL with causal routing; every stage returns the last stage's result."""
        self.engine.eval_batch(iter([(tokens, targets)]), num_micro_batches=1, reduce_output=None, bcast_loss=False)
        self.engine.train()
        b, t = tokens.shape
        dev = comm_device()
        loss, depth = torch.zeros(1, device=dev), torch.zeros(b, t, dtype=torch.long, device=dev)
        if self.eval_out is not None and self.engine.is_last_stage():
            loss, depth = self.eval_out[0].reshape(1).float().to(dev), self.eval_out[1].long().to(dev)
        src = self.grid.stage_to_global(stage_id=self.dims.pp - 1)
        group = self.grid.get_pipe_parallel_group()
        dist.broadcast(loss, src=src, group=group)
        dist.broadcast(depth, src=src, group=group)
        return loss.item(), depth.cpu()

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: Path) -> None:
        save_engine(self.engine, folder)

    def load(self, folder: Path) -> None:
        load_engine(self.engine, folder)
        self.model._sync_host_step()  # the stages loaded the step counter, not the model's hook
