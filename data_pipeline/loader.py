"""Streaming loader over prepared shards with an exactly resumable global position.

The sample stream. Epoch e of a split of N samples is one order of all its samples: the shards in a
permutation seeded by (seed, e), each shard's samples in a permutation seeded by (seed, e, shard).
Epochs follow each other into one endless stream; global position p is sample p % N of epoch p // N.

Splitting. Data-parallel rank r of W takes positions start + i*W + r, i = 0, 1, ... (its i-th
sample), so after every rank has taken n samples exactly positions [start, start + n*W) are used.
Rank-local samples are grouped into batches of batch_size and DataLoader worker w of K produces
batches w, w + K, ...; the DataLoader hands batches out in that round-robin order, so what a rank
sees does not depend on K.

State. The loader counts what it has handed out: state_dict()["position"] = start + n*W. That one
number, the same on every rank, is all a resume needs, at any W and any number of workers.
"""

from __future__ import annotations

import logging
import os
from itertools import count
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mor_dist.data_pipeline import tokenizer as toklib
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.manifest import load_manifest
from mor_dist.data_pipeline.shards import ShardReader, check_file

log = logging.getLogger("mor_dist.data")

STATE_VERSION = 1
_VERIFY = ("none", "size", "sha256")
_OPEN_SHARDS = 4  # open shard files kept per worker


class TokenDataset:
    """One split of a prepared dataset, checked against its manifest when opened: the seq_len and
    tokenizer the caller expects, and every shard (exists with the manifest's size; with
    verify="sha256" also its hash). With skip_corrupt a failing shard is left out (and logged)
    instead of raising; every process sees the same files, so all ranks leave out the same shards."""

    def __init__(self, dataset_dir: str | Path, split: str = "train", *, seq_len: int | None = None,
                 tokenizer: str | Path | None = None, verify: str = "size", skip_corrupt: bool = False):
        if verify not in _VERIFY:
            raise ValueError(f"verify={verify!r}: use one of {', '.join(_VERIFY)}")
        self.manifest = m = load_manifest(dataset_dir)
        self.split = split
        self.skip_corrupt = skip_corrupt
        if seq_len is not None and seq_len != m.seq_len:
            raise DataError(m.path, f"seq_len mismatch: the config asks for {seq_len}, the dataset was packed with {m.seq_len}")
        want = m.tokenizer["fingerprint"]
        for tok in [m.dir / m.tokenizer["file"]] + ([Path(tokenizer)] if tokenizer else []):
            if toklib.file_fingerprint(tok) != want:
                raise DataError(tok, f"tokenizer mismatch: its fingerprint is not the {want[:16]}... that {m.path} "
                                     "was tokenized with")
        self.layout = m.layout
        self.vocab_size = m.tokenizer["vocab_size"]
        self.fingerprint = m.fingerprint(split)
        self.shards: list[dict] = []  # usable shards, manifest order, each with its manifest "index"
        self.skipped_shards: list[str] = []
        for idx, entry in enumerate(m.shards(split)):
            problem = check_file(m.dir / entry["file"], entry, verify)
            if problem is None:
                self.shards.append(dict(entry, index=idx))
            elif skip_corrupt:
                log.warning("skipping shard %s: %s", m.dir / entry["file"], problem)
                self.skipped_shards.append(entry["file"])
            else:
                raise DataError(m.dir / entry["file"], problem)
        if not self.shards:
            raise DataError(m.path, f"split {split!r} has no readable samples")
        self.sizes = np.array([s["samples"] for s in self.shards], dtype=np.int64)
        self.num_samples = int(self.sizes.sum())

    def reader(self, k: int) -> ShardReader:
        s = self.shards[k]
        return ShardReader(self.manifest.dir / s["file"], self.layout, s["first_key"], s["samples"], self.vocab_size)


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


class SampleOrder:
    """Global position -> (usable shard k, sample within it). Pure function of (seed, shuffle, shard
    sizes); caches the current epoch and shard, since a reader's positions only grow."""

    def __init__(self, sizes: np.ndarray, shard_ids: list[int], seed: int, shuffle: bool):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.sizes, self.ids, self.seed, self.shuffle = sizes, shard_ids, seed, shuffle
        self.n = int(sizes.sum())
        self._epoch = -1
        self._inner_key = None

    def _set_epoch(self, e: int) -> None:
        perm = _rng(self.seed, e, 0).permutation(len(self.sizes)) if self.shuffle else np.arange(len(self.sizes))
        self._perm = perm
        self._ends = np.cumsum(self.sizes[perm])
        self._epoch = e

    def locate(self, p: int) -> tuple[int, int]:
        e, off = divmod(p, self.n)
        if e != self._epoch:
            self._set_epoch(e)
        i = int(np.searchsorted(self._ends, off, side="right"))
        k = int(self._perm[i])
        local = off - int(self._ends[i] - self.sizes[k])
        if self.shuffle:
            if self._inner_key != (e, k):
                self._inner = _rng(self.seed, e, 1, self.ids[k]).permutation(int(self.sizes[k]))
                self._inner_key = (e, k)
            local = int(self._inner[local])
        return k, local


class _RankStream(IterableDataset):
    """Batches of one data-parallel rank, from global position `start`; see the module docstring."""

    def __init__(self, ds: TokenDataset, seed: int, shuffle: bool, rank: int, world: int, start: int,
                 stop: int | None, batch_size: int):
        self.ds, self.seed, self.shuffle = ds, seed, shuffle
        self.rank, self.world, self.start, self.stop, self.batch = rank, world, start, stop, batch_size

    def _positions(self, w: int, k: int):
        b, n_local = self.batch, None
        if self.stop is not None:
            n_local = max(0, (self.stop - self.start) // self.world)  # equal count on every rank
        for j in count(w, k):
            lo = j * b
            hi = lo + b if n_local is None else min(lo + b, n_local)
            if lo >= hi:
                return
            for i in range(lo, hi):
                yield self.start + i * self.world + self.rank

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            yield from self._batches(0, 1)
            return
        try:
            yield from self._batches(info.id, info.num_workers)
        except DataError as e:
            # Handed to the consumer as a batch: raised here, torch would re-raise it there wrapped in
            # the worker's traceback, printed before the file name. Batches arrive in order, so the
            # error surfaces exactly where it would without workers.
            yield {"error": e}

    def _batches(self, w: int, k: int):
        ds = self.ds
        order = SampleOrder(ds.sizes, [s["index"] for s in ds.shards], self.seed, self.shuffle)
        readers: dict[int, ShardReader] = {}
        warned: set[int] = set()  # shards with a logged problem: one warning each, not one per sample
        positions = self._positions(w, k)
        try:
            while True:
                rows, keys, pos, skipped = [], [], [], 0
                for p in positions:
                    shard, local = order.locate(p)
                    try:
                        r = readers.get(shard)
                        if r is None:
                            if len(readers) >= _OPEN_SHARDS:
                                readers.pop(next(iter(readers))).close()
                            r = readers[shard] = ds.reader(shard)
                        arr = r.read(local)
                    except DataError as e:
                        if not ds.skip_corrupt:
                            raise
                        # Replaced by this worker's next sample so that batches stay full.
                        (log.debug if shard in warned else log.warning)("skipping sample at position %d: %s", p, e)
                        warned.add(shard)
                        skipped += 1
                        continue
                    rows.append(arr)
                    keys.append(r.first_key + local)
                    pos.append(p)
                    if len(rows) == self.batch:
                        break
                if not rows:
                    return
                # Plain numpy crosses the worker queue pickled, which for batches this small is far
                # cheaper than torch's shared-memory tensor handoff; tensors are made in the consumer.
                yield {
                    "tokens": np.stack(rows),
                    "keys": np.asarray(keys, dtype=np.int64),
                    "positions": np.asarray(pos, dtype=np.int64),
                    "skipped": skipped,
                }
                if len(rows) < self.batch:
                    return
        finally:
            for r in readers.values():
                r.close()


def _as_is(batch):
    return batch


def data_parallel_rank(rank: int | None = None, world_size: int | None = None, group=None) -> tuple[int, int]:
    """(rank, size) of the data-parallel group: explicit values, else the torch.distributed group
    (pass the data-parallel group when tensor/pipeline parallelism is on), else RANK/WORLD_SIZE."""
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(group), dist.get_world_size(group)
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise ValueError(f"data-parallel rank {rank} of world size {world_size} is not valid")
    return rank, world_size


class StreamingLoader:
    """Iterates batches {"tokens": int64 [b, seq_len + 1], "keys": int64 [b] (sample keys in the
    split), "positions": int64 [b] (global stream positions), "skipped": int} for this rank.

    epochs=None streams forever (training); epochs=n stops after n epochs, every rank getting the
    same number of samples (the fewer-than-world-size remainder is left out).
    Iterating again continues where the last iterator stopped; load_state_dict() invalidates
    iterators made before it.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, *, seed: int = 1234, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None, group=None, num_workers: int = 0,
                 prefetch_factor: int = 4, pin_memory: bool = False, epochs: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = data_parallel_rank(rank, world_size, group)
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.epochs = epochs
        self.position = 0  # samples consumed by all ranks together
        self.skipped_samples = 0  # by this rank, in skip mode
        self._generation = 0
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")

    @property
    def samples_per_epoch(self) -> int:
        return self.dataset.num_samples

    @property
    def epoch(self) -> int:
        return self.position // self.dataset.num_samples

    @property
    def tokens_per_sample(self) -> int:
        return self.dataset.layout.sample_tokens

    def __iter__(self):
        self._generation += 1
        gen = self._generation
        stop = None if self.epochs is None else self.epochs * self.dataset.num_samples
        stream = _RankStream(self.dataset, self.seed, self.shuffle, self.rank, self.world_size,
                             self.position, stop, self.batch_size)
        dl = DataLoader(stream, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                        prefetch_factor=self.prefetch_factor if self.num_workers else None)
        batches = iter(dl)
        try:
            for raw in batches:
                if gen != self._generation:
                    raise RuntimeError("the loader was restarted or its state reloaded: make a new iterator")
                if "error" in raw:
                    raise raw["error"]
                batch = {
                    "tokens": torch.from_numpy(raw["tokens"].astype(np.int64)),
                    "keys": torch.from_numpy(raw["keys"]),
                    "positions": torch.from_numpy(raw["positions"]),
                    "skipped": raw["skipped"],
                }
                if self.pin_memory:
                    batch["tokens"] = batch["tokens"].pin_memory()
                self.position += len(batch["tokens"]) * self.world_size
                self.skipped_samples += batch["skipped"]
                yield batch
        finally:
            # Stop the workers now. After a worker's error the traceback keeps the DataLoader
            # iterator in a reference cycle; left to the garbage collector, its queues can be
            # finalized first and every worker then waits out a 5 s join timeout.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "epoch": self.epoch,
            "samples_per_epoch": self.dataset.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset": self.dataset.fingerprint,
            "world_size": self.world_size,  # informational: any world size can resume
            "skipped_shards": list(self.dataset.skipped_shards),
        }

    def load_state_dict(self, state: dict) -> None:
        where = self.dataset.manifest.path
        if state.get("version") != STATE_VERSION:
            raise DataError(where, f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["dataset"] != self.dataset.fingerprint:
            raise DataError(where, f"loader state belongs to another dataset or split "
                                   f"({state['dataset'][:16]}... vs {self.dataset.fingerprint[:16]}...)")
        if (state["seed"], state["shuffle"]) != (self.seed, self.shuffle):
            raise DataError(where, f"loader state was saved with seed={state['seed']} shuffle={state['shuffle']}, "
                                   f"this loader has seed={self.seed} shuffle={self.shuffle}")
        if state["samples_per_epoch"] != self.dataset.num_samples:
            msg = (f"{state['samples_per_epoch']} samples per epoch at save time, {self.dataset.num_samples} now "
                   f"(skipped shards then: {state['skipped_shards']}, now: {self.dataset.skipped_shards})")
            if not self.dataset.skip_corrupt:
                raise DataError(where, msg)
            log.warning("resuming a changed stream: %s", msg)
        self.position = int(state["position"])
        self._generation += 1


def build_loader(cfg, batch_size: int, split: str = "train", *, rank: int | None = None,
                 world_size: int | None = None, group=None, epochs: int | None = None,
                 shuffle: bool | None = None) -> StreamingLoader:
    """Loader from a DataConfig. Train streams forever, shuffled per cfg.shuffle; val defaults to
    one pass in stored order."""
    ds = TokenDataset(cfg.dataset_dir, split, seq_len=cfg.seq_len, tokenizer=cfg.tokenizer or None,
                      verify=cfg.verify, skip_corrupt=cfg.skip_corrupt)
    if split != "train":
        epochs = 1 if epochs is None else epochs
        shuffle = False if shuffle is None else shuffle
    return StreamingLoader(
        ds, batch_size, seed=cfg.seed, shuffle=cfg.shuffle if shuffle is None else shuffle, rank=rank,
        world_size=world_size, group=group, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
        pin_memory=cfg.pin_memory, epochs=epochs)
