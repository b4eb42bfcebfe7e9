"""Preemption: SIGTERM / SIGUSR1 set a flag; every rank agrees on it at the step boundary, then the
trainer checkpoints and exits with EXIT_PREEMPTED so a batch script can requeue."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from mor_dist.parallel.dims import comm_device

# sysexits' EX_TEMPFAIL: "try again later". The SLURM batch script requeues on this code.
EXIT_PREEMPTED = 75


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank when any rank got a signal (a collective: call it on all ranks)."""
        flag = torch.tensor([1 if self.received is not None else 0], device=comm_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
