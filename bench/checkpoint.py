"""Checkpoint saves, synchronous against asynchronous (checkpoint.async_save), measured side by side.

    python bench/checkpoint.py [--quick] [--json] [--models tiny 100m] [--rounds 7]

One process, the real train module (DeepSpeed engine, ZeRO-1, AdamW) and the real CheckpointManager
(checksummed files, fsync, atomic rename, `latest`, pruning) writing into --dir. Per model, rounds of:

  steps  training steps with no save in flight: the step time alone
  sync   a synchronous save: the whole of it blocks training
  async  an asynchronous save: the blocking part (state copied to host memory, folders made), then
         training steps while the background thread writes, then the wait for the rest of the write

The variants alternate within each round and every figure is the median over rounds (wall time: the
blocking part is what training waits for). Printed: the sync save time, the async blocking time and
their ratio (the target: <= 0.20), the async write's total time, and the step time during a
background write against the step time alone (the write's cost to the steps it overlaps: on a
2-core machine the writing thread competes with training for the same cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mor_dist.checkpoint import CheckpointManager  # noqa: E402
from mor_dist.config import load_config  # noqa: E402
from mor_dist.model import build_model  # noqa: E402
from mor_dist.parallel.dims import init_distributed  # noqa: E402
from mor_dist.parallel.train_module import build_train_module  # noqa: E402

# MoR (expert-choice, 1 + shared block x 3 + 1): the tiny CPU config, and about 100M parameters.
MODELS = {
    "tiny": [],
    "100m": ["model.vocab_size=32768", "model.d_model=768", "model.n_heads=12", "model.n_kv_heads=4",
             "model.d_ff=2048", "model.n_layers=32", "data.vocab_size=32768"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=2, help="training steps per measurement")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dir", help="where the checkpoints go (default: a fresh temporary folder, removed after)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds (for CI)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.quick:  # for what the command line leaves unset
        p.set_defaults(models=["tiny"], rounds=2, steps=1)
        args = p.parse_args(argv)
    return args


def build(name: str, args):
    cfg = load_config(REPO / "configs/tiny/mor.yaml", MODELS[name] + [
        f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}",
        f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}", "train.dtype=fp32"])
    dims = init_distributed(cfg.parallel)
    torch.manual_seed(0)
    module = build_train_module(build_model(cfg), cfg, dims)
    params = sum(p.numel() for p in module.model.parameters())
    return cfg, module, params


def train(module, cfg, args, n: int) -> list[float]:
    """Seconds per step of n training steps."""
    out = []
    for _ in range(n):
        seq = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1))
        t0 = time.perf_counter()
        module.train_step([(seq[:, :-1], seq[:, 1:])], cfg.optim.lr)
        out.append(time.perf_counter() - t0)
    return out


def measure(name: str, args, root: Path) -> dict:
    cfg, module, params = build(name, args)
    ckpt = CheckpointManager(root / name, keep_last=2)
    meta = {"tokens_seen": 0, "loader": {}, "config": OmegaConf.to_container(cfg, resolve=True)}
    train(module, cfg, args, 2)  # warm-up: optimizer state exists, allocator warm
    ckpt.save(0, meta, module.save)
    ckpt.save(1, meta, module.save, background=True)  # and the first background save's one-time costs
    ckpt.wait()
    step = 1
    alone, during, sync, block, total = [], [], [], [], []
    for r in range(args.rounds):
        alone += train(module, cfg, args, args.steps)

        step += 1
        t0 = time.perf_counter()
        ckpt.save(step, meta, module.save)
        sync.append(time.perf_counter() - t0)

        step += 1
        t0 = time.perf_counter()
        ckpt.save(step, meta, module.save, background=True)
        block.append(time.perf_counter() - t0)
        during += train(module, cfg, args, args.steps)
        ckpt.wait()
        total.append(time.perf_counter() - t0)
        print(f"  {name} round {r + 1}/{args.rounds}: sync {sync[-1]:.3f}s, async blocking {block[-1]:.3f}s "
              f"(written after {total[-1]:.3f}s)", file=sys.stderr, flush=True)
    size = sum(f.stat().st_size for f in ckpt.root.joinpath(ckpt.latest_name()).iterdir())
    med = statistics.median
    return {
        "model": name, "parameters": params, "checkpoint_mb": size / 1e6, "rounds": args.rounds,
        "sync_save_s": med(sync), "async_blocking_s": med(block), "async_total_s": med(total),
        "blocking_ratio": med(b / s for b, s in zip(block, sync)),
        "step_s": med(alone), "step_during_write_s": med(during),
        "step_slowdown": med(during) / med(alone),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mor_ckpt_bench_"))
    try:
        rows = [measure(name, args, root) for name in args.models]
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"device": "cpu", "torch_threads": 1, "results": rows}, indent=2))
        return 0
    print(f"checkpoint saves, wall time, median of {args.rounds} interleaved rounds (CPU, 1 torch thread)")
    print(f"{'model':6} {'params':>8} {'ckpt MB':>8} {'sync s':>8} {'async block s':>14} {'ratio':>6} "
          f"{'async total s':>14} {'step s':>7} {'step in write s':>16}")
    for r in rows:
        print(f"{r['model']:6} {r['parameters'] / 1e6:7.1f}M {r['checkpoint_mb']:8.1f} {r['sync_save_s']:8.3f} "
              f"{r['async_blocking_s']:14.3f} {r['blocking_ratio']:6.2f} {r['async_total_s']:14.3f} "
              f"{r['step_s']:7.3f} {r['step_during_write_s']:16.3f}")
    print("ratio: async blocking / sync save (target <= 0.20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
