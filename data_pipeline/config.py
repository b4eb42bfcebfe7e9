"""The `data:` group of the config tree: where the prepared dataset lives, how it is read, and how
`mor data prepare` builds it. Plain types only, so OmegaConf can use it as a structured config.

Every numeric key carries its allowed range (see `ranged`), checked by mor_dist/config/validate.py
for configs and by `mor data` for the flags that set these keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


def ranged(default, spec: str):
    """A numeric config key with its allowed range: ">= 1", "> 0", or an interval like "[0, 1)".
    A list's range applies to each item. Defined here, at the bottom of the config tree's imports,
    so that the data group and mor_dist/config/schema.py share it."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"range": spec})
    return field(default=default, metadata={"range": spec})


@dataclass
class SourceConfig:
    """One prepared dataset of a weighted mixture (data.sources)."""

    # Where it is: a directory, or a URL as for dataset_dir. Set dir or url (the same thing: use the
    # word that reads better).
    dir: str = ""
    url: str = ""
    weight: float = 1.0  # share of the samples, relative to the other sources' weights; > 0
    name: str = ""  # TensorBoard tag data/tokens/<name>; default: the last part of dir/url


@dataclass
class DataConfig:
    # Prepared dataset: a directory holding manifest.json, tokenizer.json and the .tar shards
    # (written by `mor data prepare`, read by the loader), or its URL: file:, http(s)://, or a
    # pipe: command with {} where the file name goes (pipe:aws s3 cp s3://bucket/ds/{} -).
    dataset_dir: str = "data/default"
    # Weighted mixture of prepared datasets (one tokenizer and seq_len); when given, it replaces
    # dataset_dir for training: [{dir: data/web, weight: 0.7}, {url: http://host/code, weight: 0.3}].
    sources: List[SourceConfig] = field(default_factory=list)
    # Read order: seek (positioned reads; local shards only), stream (every shard read start to end by
    # one reader, fetched ahead), auto (stream when a source is a URL that cannot seek).
    read: str = "auto"
    read_ahead: int = ranged(1, ">= 0")  # streamed shards fetched ahead of the one being read, per source and worker
    fetch_retries: int = ranged(4, ">= 0")  # retries of a failed fetch (manifest, tokenizer, shard)
    fetch_backoff_s: float = ranged(1.0, ">= 0")  # pause before the first retry; doubles with every retry
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
    # Raw text: files, directories or globs of .txt/.md/.rst/.py (one document per file), .jsonl,
    # .jsonl.gz, .jsonl.zst, .json.gz, .json.zst (JSON lines, field text_field), .parquet and .arrow
    # (Hugging Face save_to_disk folders; column text_field).
    # Empty = the default corpus: this interpreter's standard-library sources (docs/data.md).
    inputs: List[str] = field(default_factory=list)
    text_field: str = "text"  # JSON field / parquet or arrow column holding the text
    tokenizer: str = ""  # existing tokenizer.json to use; empty = train a byte-level BPE on the inputs
    # Vocabulary of a trained tokenizer, special tokens included: at least the 256 bytes + 2 specials.
    # Unset = model.vocab_size when prepare has --config, else 4096; with --config it must equal
    # model.vocab_size (training refuses a dataset whose tokenizer has another size).
    vocab_size: Optional[int] = ranged(None, ">= 258")
    eos_token: str = "<|endoftext|>"  # separates documents in the packed stream
    pad_token: str = "<|pad|>"  # added when training a tokenizer; never written into samples
    tokenizer_train_bytes: int = ranged(1 << 30, ">= 1")  # cap on the text a tokenizer is trained on
    # Share of packed samples held out as the validation split; 0 = none (1 would leave no training data).
    val_fraction: float = ranged(0.005, "[0, 1)")
    shard_samples: int = ranged(4096, ">= 1")  # samples per .tar shard (the last shard of a split may hold fewer)
    prepare_workers: int = ranged(0, ">= 0")  # tokenize and pack processes for prepare; 0 = all CPU cores
