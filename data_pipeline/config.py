"""The `data:` group of the config tree: where the prepared dataset lives, how it is read, and how
`mor data prepare` builds it. Plain types only, so OmegaConf can use it as a structured config.

Every numeric key carries its allowed range (see `ranged`), checked by mor_dist/config/validate.py
for configs and by `mor data` for the flags that set these keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


def ranged(default, spec: str):
    """A numeric config key with its allowed range: ">= 1", "> 0", or an interval like "[0, 1)".
    A list's range applies to each item. Defined here, at the bottom of the config tree's imports,
    so that the data group and mor_dist/config/schema.py share it."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"range": spec})
    return field(default=default, metadata={"range": spec})


@dataclass
class DataConfig:
    # Prepared dataset: a directory holding manifest.json, tokenizer.json and the .tar shards
    # (written by `mor data prepare`, read by the loader).
    dataset_dir: str = "data/default"
    # Tokens per training sequence; each stored sample holds seq_len + 1 tokens (inputs + shifted
    # targets). Must equal the manifest's seq_len, and not exceed model.max_seq_len.
    seq_len: int = ranged(2048, ">= 1")
    # Shuffle seed: shard order per epoch and sample order within each shard.
    seed: int = ranged(1234, "[0, 4294967295]")
    shuffle: bool = True  # False reads the stream in stored order (validation)
    num_workers: int = ranged(2, ">= 0")  # DataLoader worker processes per data-parallel rank; 0 = in-process
    prefetch_factor: int = ranged(4, ">= 1")  # batches prefetched per worker
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
    # Vocabulary of a trained tokenizer, special tokens included: at least the 256 bytes + 2 specials.
    vocab_size: int = ranged(4096, ">= 258")
    eos_token: str = "<|endoftext|>"  # separates documents in the packed stream
    pad_token: str = "<|pad|>"  # added when training a tokenizer; never written into samples
    tokenizer_train_bytes: int = ranged(1 << 30, ">= 1")  # cap on the text a tokenizer is trained on
    # Share of packed samples held out as the validation split; 0 = none (1 would leave no training data).
    val_fraction: float = ranged(0.005, "[0, 1)")
    shard_samples: int = ranged(4096, ">= 1")  # samples per .tar shard (the last shard of a split may hold fewer)
    prepare_workers: int = ranged(0, ">= 0")  # tokenizer processes for prepare; 0 = all CPU cores
