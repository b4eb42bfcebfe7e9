"""What the trainer measures for TensorBoard beyond the losses: the parameter norm, memory, the depth
distribution of a training step, validation sums in both routing modes, and the run's guide text.
"""

from __future__ import annotations

import os
import resource

import torch
import torch.distributed as dist

from mor_dist.parallel.dims import comm_device

GIB = 2**30
SAMPLES = 3  # validation lines in the depth picture
SAMPLE_TOKENS = 40  # tokens of each

GUIDE = """**How to read this run** (mor_dist)

- **train**: losses, learning rate, gradient and parameter norms; `loss_vs_tokens` has tokens seen on
  the x axis.
- **train_routing**: the routers on training batches. A token's *depth* is how many times the shared
  block ran on it. Training picks the deepest tokens by top-k over the whole sequence; inference cannot
  see the future and uses each router's *causal* decision instead. `causal_agreement/r*` (should stay
  near 1) and `dead_tokens/r*` (near 0) say whether the two agree: **this is the thing to watch**.
  `depth` (histogram) is the depth distribution top-k gives training tokens.
- **val**: validation with causal routing (`loss`, what inference gets) and with top-k routing
  (`loss_topk`, what training sees); `routing_gap` is the difference. `depth_causal` / `depth_topk`
  are the depth histograms of validation tokens, `depth_map` shows the tokens coloured by depth.
- **train_system**: step time and tokens/s (training only), per device, MFU, memory.
"""


def param_norm(model, dims) -> float | None:
    """L2 norm of all parameters, each element counted once over the ranks: ZeRO-3 partitions on
    their data-parallel rank, tensor-parallel shards on their tensor rank, replicated parameters once.
    A collective: every rank calls it. None under pipeline stages (a stage's model object is not what
    the stage trains, and tied weights live on several stages)."""
    if dims.pp > 1:
        return None
    squares = []
    for p in model.parameters():
        part = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition of p
        if part is None and dims.dp_rank != 0:
            continue
        if not getattr(p, "tensor_model_parallel", False) and dims.tp_rank != 0:
            continue
        squares.append((p.data if part is None else part).detach().float().pow(2).sum())
    total = torch.stack(squares).sum().double() if squares else torch.zeros((), dtype=torch.float64)
    total = total.to(comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total.sqrt().item()


def memory_scalars() -> dict:
    """GPU: peak allocated and reserved bytes since the previous call (rank 0's device). CPU: the
    process's resident memory now and at its peak -- RSS, named as such."""
    if torch.cuda.is_available():
        values = {"train_system/gpu_mem_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                  "train_system/gpu_mem_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
        torch.cuda.reset_peak_memory_stats()
        return values
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"train_system/cpu_rss_gib": rss / GIB,
            "train_system/cpu_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def train_depth_shares(metrics: dict, recursions: int) -> list[float] | None:
    """Share of a training step's tokens at each depth 0..Nr, from the routers' active fractions
    (active_frac/r = share of tokens that ran recursion r, i.e. reached depth >= r)."""
    keys = [f"stats/active_frac/r{r}" for r in range(1, recursions + 1)]
    if not all(metrics.get(k) is not None for k in keys):
        return None
    reached = [1.0] + [metrics[k] for k in keys] + [0.0]
    return [max(0.0, reached[d] - reached[d + 1]) for d in range(recursions + 1)]


class EvalTally:
    """Validation sums over batches in one float64 vector, so that one all-reduce combines the ranks:
    losses in both routing modes, depth counts, and how causal depths compare with top-k ones."""

    def __init__(self, recursions: int):
        self.nr = recursions
        # [causal loss, batches, top-k loss, top-k batches, tokens, same depth, stopped early,
        #  causal depth counts (nr + 1), top-k depth counts (nr + 1)]
        self.v = torch.zeros(7 + 2 * (recursions + 1), dtype=torch.float64)
        self.samples: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, inputs, loss: float, depth, loss_topk: float | None = None, depth_topk=None) -> None:
        n, v = self.nr + 1, self.v
        v[0] += loss
        v[1] += 1
        v[7:7 + n] += torch.bincount(depth.flatten().clamp(0, self.nr), minlength=n).double()
        if depth_topk is not None:
            v[2] += loss_topk
            v[3] += 1
            v[4] += depth.numel()
            v[5] += (depth == depth_topk).sum()
            v[6] += (depth < depth_topk).sum()
            v[7 + n:] += torch.bincount(depth_topk.flatten().clamp(0, self.nr), minlength=n).double()
        for row in range(min(len(inputs), SAMPLES - len(self.samples))):
            self.samples.append((inputs[row, :SAMPLE_TOKENS], depth[row, :SAMPLE_TOKENS]))

    def reduce(self, copies: int) -> None:
        """Sum over all ranks; `copies` ranks (tensor x pipeline) saw each batch, so counts are divided."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = self.v.to(comm_device())
            dist.all_reduce(t)
            self.v = t.cpu() / copies

    @property
    def batches(self) -> float:
        return self.v[1].item()

    def loss(self) -> float:
        return (self.v[0] / self.v[1]).item()

    def has_topk(self) -> bool:
        return self.v[3].item() > 0

    def loss_topk(self) -> float:
        return (self.v[2] / self.v[3]).item()

    def depth_counts(self, mode: str) -> list[float]:
        n = self.nr + 1
        return self.v[7:7 + n].tolist() if mode == "causal" else self.v[7 + n:].tolist()

    def agreement(self) -> tuple[float, float]:
        """(share of tokens at the same depth in both modes, share that causal routing stops earlier)."""
        return (self.v[5] / self.v[4]).item(), (self.v[6] / self.v[4]).item()
