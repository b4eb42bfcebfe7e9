"""Data config (the `data:` group of the config tree)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    dataset_dir: str = "data/default"  # prepared dataset: manifest.json + WebDataset shards
    seq_len: int = 2048  # tokens per training sample (shards hold seq_len + 1 for the shifted target)
    seed: int = 1234  # shuffle seed (shard order per epoch, samples within a shard)
    num_workers: int = 0  # DataLoader workers per rank
    skip_corrupt: bool = False  # count and log corrupt samples/shards instead of failing
