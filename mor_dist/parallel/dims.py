"""Process-group layout: world = tensor x data x pipeline, in megatron-core's rank order.

Ranks are laid out tensor-fastest, then data, then pipeline (megatron's default "tp-dp-pp" order):
rank = tp_rank + tp * (dp_rank + dp * pp_rank). The environment (torchrun, srun wrappers) gives
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them we run as one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class ParallelLayoutError(ValueError):
    pass


@dataclass(frozen=True)
class ParallelDims:
    world: int
    rank: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        if self.world % (self.tp * self.pp):
            raise ParallelLayoutError(
                f"world size {self.world} is not divisible by parallel.tensor={self.tp} x parallel.pipeline={self.pp}"
            )

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world, local_rank) from the launcher's environment; (0, 1, 0) when run directly."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local


def init_distributed(parallel_cfg, backend: str | None = None) -> ParallelDims:
    """Start the default process group (gloo on CPU, nccl on GPU) and return the layout.

    A single process without launcher variables still gets a 1-rank group, so the same code path
    (DeepSpeed engine, checkpoints) serves one process and many.
    """
    rank, world, local = env_rank_world()
    dims = ParallelDims(world=world, rank=rank, tp=parallel_cfg.tensor, pp=parallel_cfg.pipeline)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000) if world == 1 else "29500")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return dims


def shutdown_distributed(dims: ParallelDims) -> None:
    """After a finished multi-process run: every rank meets, then the process groups are torn down
    in order. Left to the interpreter's exit, a rank's gloo groups could be destroyed while a peer
    was already gone, and that rank aborted (SIGABRT, exit code -6) after a run that had finished.
    A single process keeps its group (tests run several trainings in one process)."""
    if dims.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where small tensors for collectives must live: NCCL only moves CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
