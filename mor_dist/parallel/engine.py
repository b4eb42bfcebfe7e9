"""DeepSpeed engine for a (possibly tensor-parallel) MoRModel: config builder, the mpu object that
tells DeepSpeed which ranks form the data-parallel group, and per-rank byte accounting.

AdamW is torch's (no C++ op build on CPU); ZeRO 1/2/3 shard its state over the data-parallel group.
"""

from __future__ import annotations

import torch


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
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        # DeepSpeed 0.19 clips at 1.0 unless told: always say it.
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {"stage": int(p.zero_stage)},
        "bf16": {"enabled": uses_bf16(cfg)},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if dims.pp > 1:
        # The aux-loss scalar travels in the activation tuple; under TP it must not be partitioned.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, gains and router biases are left alone."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    o = optim_cfg
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)


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
    written through our checksumming writer."""
    from mor_dist.checkpoint import deepspeed_io

    deepspeed_io.install(engine)
    # universal_checkpoint_info lets ds_to_universal reshard ZeRO-1/2 saves to another DP size.
    engine.save_checkpoint(
        str(folder.parent), tag=folder.name, client_state={"universal_checkpoint_info": {}}, save_latest=False
    )


def load_engine(engine, folder) -> None:
    """Load a DeepSpeed checkpoint: engine files through our restricted reader, and DeepSpeed's own
    direct torch.load calls (universal checkpoints) guarded the same way."""
    from mor_dist.checkpoint import deepspeed_io
    from mor_dist.checkpoint.safe_load import guarded_loads

    deepspeed_io.install(engine)
    with guarded_loads():
        path, _ = engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")
