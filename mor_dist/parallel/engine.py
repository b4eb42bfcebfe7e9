"""DeepSpeed engine for a (possibly tensor-parallel) MoRModel: config builder, the mpu object that
tells DeepSpeed which ranks form the data-parallel group, and per-rank byte accounting.

AdamW is torch's fused one (no C++ op build on CPU); ZeRO 1/2/3 shard its state over the
data-parallel group. Under bf16 with ZeRO (stage >= 1, the default), gradients accumulate in fp32;
DeepSpeed refuses that without ZeRO, so stage 0 accumulates them in bf16 (warned).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("mor.train")


def import_deepspeed():
    import deepspeed

    if not torch.cuda.is_available():
        # Skip DeepSpeed's C++ op builds on CPU (~50 s each): fp32 torch AdamW needs none of them.
        deepspeed.ops.__compatible_ops__ = {}
    return deepspeed


def uses_bf16(cfg) -> bool:
    return cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg, dims, load_universal: bool = False) -> dict:
    t, p = cfg.train, cfg.parallel
    accum = t.global_batch_size // (t.micro_batch_size * dims.dp)
    bf16 = uses_bf16(cfg)
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        # DeepSpeed 0.19 clips at 1.0 unless told: always say it.
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero_config(cfg.model.d_model, int(p.zero_stage)),
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if bf16 and p.zero_stage >= 1:
        # Gradients summed over many micro-batches (16 in the paper's recipe) lose bits in bf16: keep
        # the accumulation in fp32 (DeepSpeed supports it with ZeRO; without ZeRO it refuses).
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif bf16 and accum > 1 and dims.rank == 0:
        log.warning("parallel.zero_stage=0 under bf16: gradients accumulate in bf16 over %d micro-batches "
                    "(DeepSpeed keeps fp32 accumulation for ZeRO only); zero_stage=1 keeps them in fp32", accum)
    if dims.pp > 1:
        # The aux-loss scalar travels in the activation tuple; under TP it must not be partitioned.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return ds


def zero_config(d_model: int, stage: int) -> dict:
    """ZeRO settings for the model's width. Buckets of about d_model^2 elements (the sizing Hugging
    Face's DeepSpeed integration derives from the hidden size): large enough to keep the links busy,
    small enough not to hold gigabytes of staging memory as DeepSpeed's 5e8-element defaults do.
    On a GPU, gradient reduction overlaps the backward (separate CUDA streams; not on CPU/gloo)."""
    z = {"stage": stage}
    if stage == 0:
        return z
    bucket = d_model * d_model
    z.update(contiguous_gradients=True, reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if stage == 3:
        z.update(stage3_prefetch_bucket_size=int(0.9 * bucket), stage3_param_persistence_threshold=10 * d_model)
    if torch.cuda.is_available():
        z["overlap_comm"] = True
    return z


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, gains and router biases are left alone."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    """torch's AdamW, its fused kernel (CUDA and CPU): one call for all parameters, not a few per
    tensor, and the only one that can skip an update on the device (NonFiniteGuard)."""
    o = optim_cfg
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=True)


class NonFiniteGuard:
    """Skips the update of a step whose gradients are not all finite, for an optimizer with no such
    check of its own: torch's AdamW, which DeepSpeed steps directly at ZeRO stage 0 (its ZeRO and
    bf16 optimizers check, skip and set `overflow` themselves). Unguarded, one inf gradient made every
    weight NaN, and the next checkpoint saved them.

    The check stays on the device: the fused kernel reads `found_inf` and leaves parameters, moments
    and step counts as they were when it is 1. It is agreed over the world (a pipeline stage or
    tensor-parallel shard that overflowed alone would otherwise let the others step). `found` holds
    the last step's flag (a device tensor; the train module reads it with the step's metrics)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.step = optimizer, optimizer.step
        self.found: torch.Tensor | None = None
        optimizer.step = self

    def __call__(self, *args, **kwargs):
        import torch.distributed as dist

        from mor_dist.parallel.dims import comm_device

        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        found = torch.zeros((), device=comm_device())
        if grads:
            total = torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()
            found = (~torch.isfinite(total)).float().to(found.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        self.found = self.optimizer.found_inf = found
        try:
            return self.step(*args, **kwargs)
        finally:
            del self.optimizer.found_inf


def guard_nonfinite(engine) -> NonFiniteGuard | None:
    """The guard for the engine's optimizer where it has no overflow check of its own, else None."""
    opt = engine.optimizer
    if hasattr(opt, "overflow") or not isinstance(opt, torch.optim.Optimizer):
        return None
    return NonFiniteGuard(opt)


class MegatronMpu:
    """What DeepSpeed asks of an mpu, answered from megatron-core's parallel_state.

    "Model parallel" for DeepSpeed means the ranks holding different shards of one replica (here the
    tensor-parallel group; pipeline stages go through DeepSpeed's own topology instead).
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()


# ---------------------------------------------------------------------- per-rank bytes (measured)
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def rank_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds for parameters and optimizer state (master copies included); gradients
    live only between backward and step (train_module.grad_bytes).

    ZeRO-3 parameters count their local partition (ds_tensor), not the gathered size.
    """
    params = 0
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):
            params += _nbytes(p.ds_tensor)
        else:
            params += _nbytes(p)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
    if inner is opt:  # no ZeRO: the module's own parameters are stepped
        stepped = [p for g in opt.param_groups for p in g["params"]]
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3 empties the groups between steps
        stepped = list(opt.fp32_partitioned_groups_flat)
    else:  # ZeRO-1/2: one flat fp32 partition per group
        stepped = [p for g in inner.param_groups for p in g["params"]]
    state = sum(
        _nbytes(v) for p in stepped for v in inner.state.get(p, {}).values() if torch.is_tensor(v) and v.dim() > 0
    )
    master = 0 if inner is opt else sum(_nbytes(p) for p in stepped)
    return {"params": params, "optimizer": state + master}


def save_engine(engine, folder) -> None:
    """DeepSpeed checkpoint of any engine into `folder` (its name is the DeepSpeed tag), every file
    written through our checksumming writer (or staged for a background write: store.staged)."""
    from mor_dist.checkpoint import deepspeed_io

    deepspeed_io.install(engine)
    # universal_checkpoint_info: what DeepSpeed's converter and checkpoint/universal.py need to read
    # this save back at any other layout (model names, tensor-parallel splits, tied stages).
    engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False,
                           client_state={"universal_checkpoint_info": deepspeed_io.universal_info(engine)})


def load_engine(engine, folder) -> None:
    """Load a DeepSpeed checkpoint: engine files through our restricted reader, and DeepSpeed's own
    direct torch.load calls (universal checkpoints) guarded the same way. An engine built with
    load_universal reads a universal/ folder (checkpoint/universal.py) by the model's names, then
    the model's buffers from it."""
    import contextlib

    from mor_dist.checkpoint import deepspeed_io
    from mor_dist.checkpoint.safe_load import guarded_loads

    deepspeed_io.install(engine)
    universal = engine.load_universal_checkpoint()
    names = deepspeed_io.universal_names(engine) if universal else contextlib.nullcontext()
    with guarded_loads(), names:
        path, _ = engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")
    if universal:
        deepspeed_io.load_buffers(engine, folder)
