"""Loader throughput next to the tiny model's training throughput, measured in the same run.

    python bench/data_throughput.py [--config configs/tiny/mor.yaml] [--dataset DIR] [--check]

The dataset (default data/bench, prepared on first use from the default corpus at the config's
seq_len and vocabulary size) is read by the StreamingLoader alone with 0 and 2 workers; then the
model trains (forward, backward, AdamW step) on batches from the same loader. Tokens are counted
the same way on both sides: micro_batch_size x seq_len per batch. --check exits 1 unless the loader
is at least --min-ratio times faster than training consumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def loader_tokens_per_s(ds, batch: int, seq_len: int, workers: int, seconds: float, seed: int) -> float:
    from mor_dist.data_pipeline.loader import StreamingLoader

    loader = StreamingLoader(ds, batch, seed=seed, rank=0, world_size=1, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        next(it)
        n += 1
    it.close()
    return n * batch * seq_len / dt


def train_tokens_per_s(cfg, ds, batch: int, steps: int, warmup: int) -> tuple[float, float]:
    """(tokens/s, share of the time spent waiting for the loader) over `steps` optimizer steps."""
    from mor_dist.data_pipeline.loader import StreamingLoader
    from mor_dist.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    it = iter(StreamingLoader(ds, batch, seed=cfg.data.seed, rank=0, world_size=1, num_workers=0))
    wait = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            wait, t0 = 0.0, time.perf_counter()
        w0 = time.perf_counter()
        tokens = next(it)["tokens"]
        wait += time.perf_counter() - w0
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    dt = time.perf_counter() - t0
    it.close()
    return steps * batch * cfg.data.seq_len / dt, wait / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs/tiny/mor.yaml"))
    ap.add_argument("--dataset", default=str(REPO / "data/bench"), help="prepared dataset (made if missing)")
    ap.add_argument("--loader-seconds", type=float, default=3.0)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--min-ratio", type=float, default=20.0)
    ap.add_argument("--check", action="store_true", help="exit 1 if a loader ratio is below --min-ratio")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = ap.parse_args(argv)

    from mor_dist.config import load_config
    from mor_dist.data_pipeline.loader import TokenDataset
    from mor_dist.data_pipeline.manifest import MANIFEST
    from mor_dist.data_pipeline.prepare import prepare_dataset

    cfg = load_config(args.config)
    seq_len, batch = cfg.data.seq_len, cfg.train.micro_batch_size
    if not (Path(args.dataset) / MANIFEST).is_file():
        print(f"preparing {args.dataset} from the default corpus (once)...", file=sys.stderr)
        prepare_dataset(args.dataset, None, seq_len=seq_len, vocab_size=cfg.model.vocab_size, progress=False)
    ds = TokenDataset(args.dataset, seq_len=seq_len)

    result = {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "seq_len": seq_len,
        "micro_batch_size": batch,
        "dataset_samples": ds.num_samples,
    }
    for workers in (0, 2):
        result[f"loader_tokens_per_s_workers{workers}"] = loader_tokens_per_s(
            ds, batch, seq_len, workers, args.loader_seconds, cfg.data.seed)
    train, wait = train_tokens_per_s(cfg, ds, batch, args.train_steps, args.warmup_steps)
    result["train_tokens_per_s"] = train
    result["train_data_wait_share"] = wait
    ratios = {w: result[f"loader_tokens_per_s_workers{w}"] / train for w in (0, 2)}
    for w, r in ratios.items():
        result[f"ratio_workers{w}"] = r

    if args.json:
        print(json.dumps(result))
    else:
        print(f"config {args.config} | seq_len {seq_len} | micro batch {batch} | {torch.get_num_threads()} torch threads")
        for w in (0, 2):
            print(f"loader, {w} workers : {result[f'loader_tokens_per_s_workers{w}']:>12,.0f} tokens/s  "
                  f"= {ratios[w]:,.0f}x training")
        print(f"tiny model training : {train:>12,.0f} tokens/s  (waiting for data {100 * wait:.2f}% of the time)")
    if args.check and min(ratios.values()) < args.min_ratio:
        print(f"FAIL: loader only {min(ratios.values()):.1f}x faster than training (need {args.min_ratio}x)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
