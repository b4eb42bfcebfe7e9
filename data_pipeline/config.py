"""The `data:` group of the config tree: where the prepared dataset lives, how it is read, and how
`mor data prepare` builds it. Plain types only, so OmegaConf can use it as a structured config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class DataConfig:
    # Prepared dataset: a directory holding manifest.json, tokenizer.json and the .tar shards
    # (written by `mor data prepare`, read by the loader).
    dataset_dir: str = "data/default"
    # Tokens per training sequence; each stored sample holds seq_len + 1 tokens (inputs + shifted
    # targets). Must equal the manifest's seq_len.
    seq_len: int = 2048
    seed: int = 1234  # shuffle seed: shard order per epoch and sample order within each shard
    shuffle: bool = True  # False reads the stream in stored order (validation)
    num_workers: int = 2  # DataLoader worker processes per data-parallel rank
    prefetch_factor: int = 4  # batches prefetched per worker
    pin_memory: bool = False  # pin host batches (only useful with a CUDA device)
    # Opt-in: skip (count and log) missing/truncated shards and corrupt samples instead of raising.
    skip_corrupt: bool = False
    # Shard checks when a loader starts: size (exists with the manifest's byte size; cheap),
    # sha256 (also hashes every shard once; reads the whole dataset), none.
    verify: str = "size"

    # ---- `mor data prepare` / `mor data tokenizer` ----
    # Raw text: files, directories or globs of .txt/.md/.rst/.py (one document per file), .jsonl
    # (one document per line, field text_field) and .parquet (column text_field).
    # Empty = the default corpus: this interpreter's standard-library sources (docs/data.md).
    inputs: List[str] = field(default_factory=list)
    text_field: str = "text"  # JSON field / parquet column holding the text
    tokenizer: str = ""  # existing tokenizer.json to use; empty = train a byte-level BPE on the inputs
    vocab_size: int = 4096  # vocabulary of a trained tokenizer, special tokens included
    eos_token: str = "<|endoftext|>"  # separates documents in the packed stream
    pad_token: str = "<|pad|>"  # added when training a tokenizer; never written into samples
    tokenizer_train_bytes: int = 1 << 30  # cap on the text a tokenizer is trained on
    val_fraction: float = 0.005  # share of packed samples held out as the validation split
    shard_samples: int = 4096  # samples per .tar shard (the last shard of a split may hold fewer)
    prepare_workers: int = 0  # tokenizer processes for prepare; 0 = all CPU cores
