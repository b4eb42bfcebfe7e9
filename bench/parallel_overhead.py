"""Throughput of DP=1 vs TP=2 vs TP=2 with sequence parallelism vs PP=2 on this machine, per-rank
parameter and optimizer bytes, and the activation bytes one micro-batch saves for backward per rank.

    python bench/parallel_overhead.py [--config configs/tiny/mor.yaml] [--steps 5] [override ...]

Each layout runs in its own local gloo world (one thread per rank) with the same global batch;
tokens/s counts the global batch's tokens per optimizer step, timed after warm-up steps.
Activation bytes are measured with mor_dist.parallel.activation_bytes on one micro-batch (not
for PP, whose stages run their part of the model inside DeepSpeed's schedule).
"""

from __future__ import annotations

import argparse
import time

LAYOUTS = [
    ("DP=1", 1, []),
    ("TP=2", 2, ["parallel.tensor=2"]),
    ("TP=2+SP", 2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("PP=2", 2, ["parallel.pipeline=2"]),
]


def _rank(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    import torch
    import torch.distributed as dist

    from mor_dist.config import load_config
    from mor_dist.model import build_model
    from mor_dist.parallel.activation_bytes import SavedActivationBytes
    from mor_dist.parallel.dims import init_distributed
    from mor_dist.parallel.train_module import build_train_module

    cfg = load_config(config, overrides)
    dims = init_distributed(cfg.parallel)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    module = build_train_module(model, cfg, dims)
    module.measure_bytes = True
    t = cfg.train
    accum = t.global_batch_size // (t.micro_batch_size * dims.dp)
    g = torch.Generator().manual_seed(0)

    def micro():
        out = []
        for _ in range(accum):
            seq = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=g)
            out.append((seq[:, :-1], seq[:, 1:]))
        return out

    for _ in range(warmup):
        module.train_step(micro(), cfg.optim.lr)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        module.train_step(micro(), cfg.optim.lr)
    dist.barrier()
    seconds = time.perf_counter() - start
    activations = None
    if dims.pp == 1:
        tokens, targets = micro()[0]
        with SavedActivationBytes(model) as saved:
            model(tokens, targets)
        activations = saved.bytes
    return {"tokens_per_s": steps * t.global_batch_size * cfg.data.seq_len / seconds, "activations": activations,
            **module.last_rank_bytes}


def main() -> None:
    from mor_dist.parallel.local_world import run_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny/mor.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*", default=["data.seq_len=128", "train.global_batch_size=16", "train.micro_batch_size=4"])
    args = parser.parse_args()
    print(f"{args.config} {' '.join(args.overrides)}; {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'layout':<8} {'ranks':>5} {'tokens/s':>10} {'vs DP=1':>8} {'params/rank (bytes)':>22} "
          f"{'optimizer/rank (bytes)':>24} {'activations/rank':>17}")
    base = None
    for name, world, extra in LAYOUTS:
        ranks = run_world(_rank, world, args.config, args.overrides + extra, args.steps, args.warmup)
        params = " / ".join(f"{r['params']:,}" for r in ranks)
        optim = " / ".join(f"{r['optimizer']:,}" for r in ranks)
        act = ranks[0]["activations"]
        speed = ranks[0]["tokens_per_s"]
        base = base or speed
        print(f"{name:<8} {world:>5} {speed:>10.0f} {speed / base:>7.2f}x {params:>22} {optim:>24} "
              f"{(f'{act:,}' if act is not None else '-'):>17}")


if __name__ == "__main__":
    main()
