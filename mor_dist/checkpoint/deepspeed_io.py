"""DeepSpeed's checkpoint files through our reader and writer, and what a checkpoint must carry to be
read back at another layout.

DeepSpeed reads and writes every engine file through `engine.checkpoint_engine`. Ours writes with
checksums taken on the way (store.write_file) and reads with the restricted unpickler (safe_load);
`install(engine)` puts it in place of DeepSpeed's TorchCheckpointEngine after initialize. While
store.staged() is active (asynchronous saves), it copies each file's state to host memory instead,
for a background thread to write.

`universal_info(engine)` is saved with every checkpoint (DeepSpeed's universal_checkpoint_info):
each engine parameter's name in the single-device model, how tensor parallelism split it, and where
pipeline stages tie it. `universal_names(engine)` lets DeepSpeed's universal loading read a
universal/ folder (checkpoint/universal.py) by those model names at any layout.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from mor_dist.checkpoint.convert_universal import FIRST_STAGE
from mor_dist.checkpoint.errors import CheckpointError
from mor_dist.checkpoint.safe_load import safe_load
from mor_dist.checkpoint.store import stage_or_write
from mor_dist.checkpoint.universal import BUFFERS, NAMES


class SafeCheckpointEngine(TorchCheckpointEngine):
    def save(self, state_dict, path: str):
        stage_or_write(state_dict, path, _use_new_zipfile_serialization=self.zipfile_serialization)

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)


def install(engine) -> None:
    """Replace the engine's checkpoint engine (DeepSpeedEngine and PipelineEngine alike)."""
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


# ---------------------------------------------------------------------- names across layouts
def model_of(engine):
    """The single-device MoRModel an engine trains: its module, or under pipeline stages the model
    the stage layers run (parallel/stages.py keeps it as `.model`)."""
    from deepspeed.pipe import PipelineModule

    if isinstance(engine.module, PipelineModule):
        return next(f.model for f in engine.module.forward_funcs if hasattr(f, "model"))
    return engine.module


def model_names(engine) -> dict:
    """Engine parameter -> its name in the single-device model (megatron's `.inner` wrappers and
    pipeline layer indices gone): the same object, found by identity."""
    by_id = {id(p): n.replace(".inner.", ".") for n, p in model_of(engine).named_parameters()}
    return {p: by_id[id(p)] for p in engine.module.parameters()}


def split_dim(p) -> int | None:
    """Dimension along which tensor parallelism shards this parameter (megatron's attribute)."""
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def universal_info(engine) -> dict:
    """What DeepSpeed's converter and the renaming need to read this layout's files at any other.
    A collective the first time (every rank saves together), then kept on the engine."""
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, TP_REPLICATED_PARAMETER_PATTERNS,
    )

    info = getattr(engine, "_mor_universal_info", None)
    if info is not None:
        return info
    names = model_names(engine)
    stage = getattr(engine, "stage_id", 0)
    local = {n: (names[p], split_dim(p), stage) for n, p in engine.module.named_parameters()}
    everyone = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
    model, dims, stages = {}, {}, {}
    for ranks_params in everyone:
        for n, (m, dim, s) in ranks_params.items():
            model[n], dims[n] = m, dim
            stages.setdefault(n, set()).add(s)
    info = {NAMES: model, FIRST_STAGE: {n: min(s) for n, s in stages.items() if len(s) > 1}}
    if any(d is not None for d in dims.values()):
        # Exact names: the converter merges tensor-parallel shards by these (anything else: dim 0).
        info[TP_REPLICATED_PARAMETER_PATTERNS] = [_exact(n) for n, d in dims.items() if d is None]
        info[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] = [_exact(n) for n, d in dims.items() if d == 1]
    engine._mor_universal_info = info
    return info


def _exact(name: str) -> str:
    return "^" + re.escape(name) + "$"


def _tensor_parallel_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


@contextlib.contextmanager
def universal_names(engine):
    """For the length of a universal load: the optimizer knows each parameter by its model name (the
    folder's), and each tensor-parallel shard where it sits in the full tensor (DeepSpeed's restore
    metadata, which its ZeRO 1, 2 and 3 loaders honour). The optimizer's hyperparameters are this
    run's config's afterwards: ZeRO-3's universal loader copies the first group's onto every group."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META

    opt = engine.optimizer
    if not hasattr(opt, "param_names"):
        raise CheckpointError("a universal checkpoint loads into a ZeRO (stage >= 1) or bf16 optimizer only")
    tp = _tensor_parallel_size()
    saved_names, opt.param_names = opt.param_names, model_names(engine)
    split = [p for p in engine.module.parameters() if split_dim(p) is not None]
    for p in split:
        full = list(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the unpartitioned shape in ds_shape
        full[split_dim(p)] *= tp
        setattr(p, DS_AUTOTP_UC_META, {"partition_dim": split_dim(p), "logical_shape": tuple(full)})
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    # ZeRO-1/2 read this rank's tensor-parallel position off the optimizer's mpu, which a pipeline
    # engine's optimizer lacks (it would load every shard as if tp were 1).
    saved_mpu = getattr(opt, "mpu", None)
    if hasattr(opt, "mpu"):
        opt.mpu = _MegatronTensorParallel()
    try:
        with _tensor_parallel_group(tp):
            yield
    finally:
        opt.param_names = saved_names
        if hasattr(opt, "mpu"):
            opt.mpu = saved_mpu
        for p in split:
            delattr(p, DS_AUTOTP_UC_META)
        for group, kept in zip(opt.param_groups, hyper):
            group.update(kept)
        # ZeRO-3's loader hands every group the same step tensor, which AdamW then advances once per
        # group and step: each group gets its own.
        for state in getattr(opt, "optimizer", opt).state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


class _MegatronTensorParallel:
    """The two questions ZeRO-1/2's universal loader asks of an mpu, answered by megatron-core."""

    def get_tensor_model_parallel_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0

    def get_tensor_model_parallel_world_size(self) -> int:
        return _tensor_parallel_size()


@contextlib.contextmanager
def _tensor_parallel_group(tp: int):
    """ZeRO-3's universal loader finds the tensor-parallel group in DeepSpeed's own registry, which
    only its AutoTP fills: megatron's group stands in there for the length of the load."""
    from deepspeed.utils import groups

    if tp == 1 or groups._TENSOR_MODEL_PARALLEL_GROUP is not None:
        yield
        return
    from megatron.core import parallel_state as ps

    groups._TENSOR_MODEL_PARALLEL_GROUP = ps.get_tensor_model_parallel_group()
    try:
        yield
    finally:
        groups._TENSOR_MODEL_PARALLEL_GROUP = None


@torch.no_grad()
def load_buffers(engine, folder) -> None:
    """The model's buffers (step counter, router bias and loads) from a universal folder: DeepSpeed's
    universal loading restores parameters and optimizer state only."""
    saved = safe_load(folder / BUFFERS)
    for name, buf in model_of(engine).named_buffers():
        if name in saved:
            buf.copy_(saved[name])
