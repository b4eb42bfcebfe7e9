"""Throughput of DP=1 vs TP=2 vs PP=2 on this machine, and per-rank parameter and optimizer bytes.

    python bench/parallel_overhead.py [--config configs/tiny/mor.yaml] [--steps 5] [override ...]

Each layout runs in its own local gloo world (one thread per rank) with the same global batch;
tokens/s counts the global batch's tokens per optimizer step, timed after warm-up steps.
"""

from __future__ import annotations

import argparse
import time

LAYOUTS = [("DP=1", 1, []), ("TP=2", 2, ["parallel.tensor=2"]), ("PP=2", 2, ["parallel.pipeline=2"])]


def _rank(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    import torch
    import torch.distributed as dist

    from mor_dist.config import load_config
    from mor_dist.model import build_model
    from mor_dist.parallel.dims import init_distributed
    from mor_dist.parallel.train_module import build_train_module

    cfg = load_config(config, overrides)
    dims = init_distributed(cfg.parallel)
    torch.manual_seed(cfg.train.seed)
    module = build_train_module(build_model(cfg), cfg, dims)
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
    return {"tokens_per_s": steps * t.global_batch_size * cfg.data.seq_len / seconds, **module.last_rank_bytes}


def main() -> None:
    from mor_dist.parallel.local_world import run_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny/mor.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*", default=["data.seq_len=128", "train.global_batch_size=16", "train.micro_batch_size=4"])
    args = parser.parse_args()
    print(f"{args.config} {' '.join(args.overrides)}; {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'layout':<6} {'ranks':>5} {'tokens/s':>10} {'params/rank (bytes)':>22} {'optimizer/rank (bytes)':>24}")
    for name, world, extra in LAYOUTS:
        ranks = run_world(_rank, world, args.config, args.overrides + extra, args.steps, args.warmup)
        params = " / ".join(f"{r['params']:,}" for r in ranks)
        optim = " / ".join(f"{r['optimizer']:,}" for r in ranks)
        print(f"{name:<6} {world:>5} {ranks[0]['tokens_per_s']:>10.0f} {params:>22} {optim:>24}")


if __name__ == "__main__":
    main()
