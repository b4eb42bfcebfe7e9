"""Streaming loader over prepared shards -- local or at URLs, one dataset or a weighted mixture --
with an exactly resumable state.

Two read orders (data_pipeline/order.py has the arithmetic):

seek (local shards, and every finite pass such as validation). Global index t of the mixture is
source j's stream position p (Mixture); p is a sample of j (SampleOrder). Data-parallel rank r of W
takes indices start + i*W + r; its samples are grouped into batches, and DataLoader worker w of K
builds batches w, w + K, ... (the DataLoader hands them out round-robin, so what a rank sees does not
depend on K). The state is one number, start + n*W after n samples per rank: a resume at any W and
any K continues the same global order.

stream (shards that can only be read start to end: http(s), pipe: commands). Reader g = r*K + w owns
whole shards -- a lane per source -- so every shard is fetched by one reader, once per epoch, while
the next ones are fetched ahead. Reader g's samples come from its sources by its own mixture
schedule. The state is the lane plan the run started from plus the batches consumed per rank, from
which every lane's progress follows. The same W, K and batch size resume exactly; another layout
re-deals every unread (part of a) shard over the new lanes: no sample lost, none read twice.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mor_dist.data_pipeline import remote
from mor_dist.data_pipeline import tokenizer as toklib
from mor_dist.data_pipeline.errors import BAD_SHARD_HINT, DataError
from mor_dist.data_pipeline.manifest import Manifest, load_manifest
from mor_dist.data_pipeline.order import (Mixture, SampleOrder, advance_lanes, fresh_lanes, lanes_from_position,
                                          redeal_lanes)
from mor_dist.data_pipeline.shards import MemoryShard, ShardReader, check_file
from mor_dist.data_pipeline.streams import LaneStream, PositionStream, lane_mixture_stream, reader_batches

log = logging.getLogger("mor_dist.data")

STATE_VERSION = 2
_VERIFY = ("none", "size", "sha256")
READS = ("auto", "seek", "stream")


class TokenDataset:
    """One split of a prepared dataset, local or at a URL, checked against its manifest when opened:
    the seq_len and tokenizer the caller expects, and every local shard (exists with the manifest's
    size; with verify="sha256" also its hash). Remote shards are checked (size and sha256) every time
    they are fetched. With skip_corrupt a failing shard is left out (and logged) instead of raising;
    every process sees the same files, so all ranks leave out the same local shards."""

    def __init__(self, dataset_dir: str | Path | Manifest, split: str = "train", *, seq_len: int | None = None,
                 tokenizer: str | Path | None = None, verify: str = "size", skip_corrupt: bool = False,
                 fetch: remote.FetchPolicy | None = None, name: str | None = None):
        if verify not in _VERIFY:
            raise ValueError(f"verify={verify!r}: use one of {', '.join(_VERIFY)}")
        self.fetch = fetch or remote.FetchPolicy()
        self.manifest = m = dataset_dir if isinstance(dataset_dir, Manifest) else load_manifest(dataset_dir, self.fetch)
        self.location = m.base
        self.name = name or remote.display_name(m.base)
        self.split = split
        self.skip_corrupt = skip_corrupt
        if seq_len is not None and seq_len != m.seq_len:
            raise DataError(m.path, f"seq_len mismatch: the config asks for {seq_len}, the dataset was packed with "
                            f"{m.seq_len}; set data.seq_len={m.seq_len}, or prepare the data again at {seq_len} "
                            "into another data.dataset_dir")
        want = m.tokenizer["fingerprint"]
        for tok in [m.locate(m.tokenizer["file"])] + ([str(tokenizer)] if tokenizer else []):
            if _tokenizer_fingerprint(tok, self.fetch) != want:
                raise DataError(tok, f"tokenizer mismatch: its fingerprint is not the {want[:16]}... that {m.path} "
                                     "was tokenized with")
        self.layout = m.layout
        self.vocab_size = m.tokenizer["vocab_size"]
        self.fingerprint = m.fingerprint(split)
        self.shards: list[dict] = []  # usable shards, manifest order, each with its manifest "index"
        self.skipped_shards: list[str] = []
        for idx, entry in enumerate(m.shards(split)):
            loc = m.shard_location(entry)
            local = remote.local_path(loc)
            if local is None:
                remote.check_location(loc)
                problem = None  # checked when fetched
            else:
                problem = check_file(local, entry, verify)
            if problem is None:
                self.shards.append(dict(entry, index=idx, location=loc, local=local))
            elif skip_corrupt:
                log.warning("skipping shard %s: %s", loc, problem)
                self.skipped_shards.append(entry["file"])
            else:
                raise DataError(loc, f"{problem}; {BAD_SHARD_HINT}")
        if not self.shards:
            raise DataError(m.path, f"split {split!r} has no readable samples")
        self.seekable = all(s["local"] is not None for s in self.shards)
        self.sizes = np.array([s["samples"] for s in self.shards], dtype=np.int64)
        self.num_samples = int(self.sizes.sum())

    def reader(self, k: int) -> ShardReader | MemoryShard:
        """Usable shard k, opened for reading: a local file directly, anything else fetched whole."""
        s = self.shards[k]
        if s["local"] is not None:
            return ShardReader(s["local"], self.layout, s["first_key"], s["samples"], self.vocab_size)
        data = remote.fetch(s["location"], self.fetch, s["bytes"], s["sha256"], what="shard")
        return MemoryShard(data, s["location"], self.layout, s["first_key"], s["samples"], self.vocab_size)

    def order(self, seed: int, shuffle: bool) -> SampleOrder:
        return SampleOrder(self.sizes, [s["index"] for s in self.shards], seed, shuffle)


def _tokenizer_fingerprint(loc: str, policy: remote.FetchPolicy) -> str:
    if remote.local_path(loc) is not None:
        return toklib.file_fingerprint(remote.local_path(loc))
    try:
        return toklib.fingerprint(remote.read_text(loc, policy, "tokenizer"))
    except DataError as e:
        raise DataError(loc, e.problem) from None


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


def tag_name(name: str) -> str:
    """A source name as a TensorBoard tag component."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "source"


class StreamingLoader:
    """Iterates batches {"tokens": int64 [b, seq_len + 1], "keys": int64 [b] (sample keys in their
    split), "positions": int64 [b] (positions in their source's stream), "source": int64 [b] (index of
    the source), "skipped": int} for this rank.

    datasets: one TokenDataset, or a list mixed by `weights` (one seq_len and tokenizer for all).
    read: seek | stream | auto (stream when a source cannot seek). epochs=None streams forever
    (training); epochs=n stops after n epochs (of the first source to run out, for a mixture), every
    rank getting the same number of samples, always in seek order.
    Iterating again continues where the last iterator stopped; load_state_dict() invalidates
    iterators made before it.
    """

    def __init__(self, dataset, batch_size: int, *, weights: list[float] | None = None, read: str = "auto",
                 seed: int = 1234, shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
                 group=None, num_workers: int = 0, prefetch_factor: int = 4, pin_memory: bool = False,
                 epochs: int | None = None, read_ahead: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if read not in READS:
            raise ValueError(f"read={read!r}: use one of {', '.join(READS)}")
        self.datasets = list(dataset) if isinstance(dataset, (list, tuple)) else [dataset]
        self.dataset = self.datasets[0]
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(self.datasets)
        if len(self.weights) != len(self.datasets):
            raise ValueError(f"{len(self.weights)} weights for {len(self.datasets)} datasets")
        _check_mixable(self.datasets)
        self.batch_size = batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = data_parallel_rank(rank, world_size, group)
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.epochs = epochs
        self.read_ahead = read_ahead
        unseekable = next((ds for ds in self.datasets if not ds.seekable), None)
        if read == "seek" and unseekable is not None:
            raise DataError(unseekable.location, "data.read=seek needs shards that allow random access (local "
                                                 "paths, file: URLs); use data.read=stream or auto")
        self.streamed = epochs is None and (read == "stream" or (read == "auto" and unseekable is not None))
        self.readers_per_rank = max(1, num_workers)
        self.position = 0  # seek order: global index consumed by all ranks together
        self.skipped_samples = 0  # by this rank, in skip mode
        self._batches_done = 0  # stream order: batches this rank consumed since the lane plan
        self._lanes = self._new_lanes()
        self._generation = 0

    # ---- layout and lanes ----

    @property
    def readers(self) -> int:
        return self.world_size * self.readers_per_rank

    def _layout(self) -> list[int]:
        return [self.world_size, self.readers_per_rank, self.batch_size]

    def _new_lanes(self) -> dict:
        return {"gen": 0, "layout": self._layout(), "base": [fresh_lanes(self.readers) for _ in self.datasets],
                "consumed": [0] * len(self.datasets)}

    def _lane_taken(self, lanes: dict, n: int) -> list[list[int]]:
        """[source][reader] samples taken since lanes' plan, n batches per rank later."""
        world, k, b = lanes["layout"]
        taken = [[0] * (world * k) for _ in self.datasets]
        for g in range(world * k):
            mix = Mixture(self.weights, self.seed, lane_mixture_stream(lanes["gen"], g))
            for j, c in enumerate(mix.counts(reader_batches(n, g % k, k) * b)):
                taken[j][g] = c
        return taken

    # ---- what has been read ----

    @property
    def samples_per_epoch(self) -> int:
        return self.dataset.num_samples

    @property
    def tokens_per_sample(self) -> int:
        return self.dataset.layout.sample_tokens

    def source_samples(self) -> list[int]:
        """Samples each source has given to all ranks together."""
        if not self.streamed:
            return Mixture(self.weights, self.seed).counts(self.position)
        taken = self._lane_taken(self._lanes, self._batches_done)
        return [c + sum(t) for c, t in zip(self._lanes["consumed"], taken)]

    def source_names(self) -> list[str]:
        names = [tag_name(ds.name) for ds in self.datasets]
        return names if len(set(names)) == len(names) else [f"{n}_{j}" for j, n in enumerate(names)]

    @property
    def epoch(self) -> int:
        """Complete passes over every source (the least of the sources' epochs)."""
        return min(n // ds.num_samples for n, ds in zip(self.source_samples(), self.datasets))

    # ---- iteration ----

    def __iter__(self):
        self._generation += 1
        gen = self._generation
        args = (self.datasets, self.weights, self.seed, self.shuffle, self.rank, self.world_size)
        if self.streamed:
            stream = LaneStream(*args, self.readers_per_rank, self.batch_size, self._lanes, self._batches_done,
                                self.read_ahead)
        else:
            stop = None
            if self.epochs is not None:
                stop = Mixture(self.weights, self.seed).end([self.epochs * ds.num_samples for ds in self.datasets])
            stream = PositionStream(*args, self.position, stop, self.batch_size)
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
                    "source": torch.from_numpy(raw["source"]),
                    "skipped": raw["skipped"],
                }
                if self.pin_memory:
                    batch["tokens"] = batch["tokens"].pin_memory()
                self.position += len(batch["tokens"]) * self.world_size
                self._batches_done += 1
                self.skipped_samples += batch["skipped"]
                yield batch
        finally:
            # Stop the workers now. After a worker's error the traceback keeps the DataLoader
            # iterator in a reference cycle; left to the garbage collector, its queues can be
            # finalized first and every worker then waits out a 5 s join timeout.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    # ---- state ----

    def state_dict(self) -> dict:
        state = {
            "version": STATE_VERSION,
            "order": "stream" if self.streamed else "seek",
            "position": self.position,
            "epoch": self.epoch,
            "samples_per_epoch": self.dataset.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset": self.dataset.fingerprint,
            "sources": [{"name": n, "fingerprint": ds.fingerprint, "samples": ds.num_samples, "weight": w}
                        for n, ds, w in zip(self.source_names(), self.datasets, self.weights)],
            "world_size": self.world_size,  # informational: any world size can resume
            "skipped_shards": [f for ds in self.datasets for f in ds.skipped_shards],
        }
        if self.streamed:
            state["lanes"] = dict(self._lanes, batches=self._batches_done)
        return state

    def load_state_dict(self, state: dict) -> None:
        where = self.dataset.manifest.path
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise DataError(where, f"loader state version {version!r}, expected {STATE_VERSION}")
        saved = state.get("sources") or [{"fingerprint": state["dataset"], "samples": state["samples_per_epoch"],
                                          "weight": 1.0}]
        if [s["fingerprint"] for s in saved] != [ds.fingerprint for ds in self.datasets]:
            raise DataError(where, f"loader state belongs to another dataset or split (or mixture) "
                                   f"({saved[0]['fingerprint'][:16]}... vs {self.dataset.fingerprint[:16]}..., "
                                   f"{len(saved)} vs {len(self.datasets)} sources)")
        if [s["weight"] for s in saved] != self.weights:
            raise DataError(where, f"loader state was saved with mixture weights {[s['weight'] for s in saved]}, "
                                   f"this loader has {self.weights}")
        if (state["seed"], state["shuffle"]) != (self.seed, self.shuffle):
            raise DataError(where, f"loader state was saved with seed={state['seed']} shuffle={state['shuffle']}, "
                                   f"this loader has seed={self.seed} shuffle={self.shuffle}")
        then, now = [s["samples"] for s in saved], [ds.num_samples for ds in self.datasets]
        if then != now:
            msg = (f"{then} samples per epoch at save time, {now} now (skipped shards then: "
                   f"{state['skipped_shards']}, now: {[f for ds in self.datasets for f in ds.skipped_shards]})")
            if not any(ds.skip_corrupt for ds in self.datasets):
                raise DataError(where, f"{msg}; resume with the shards as they were at save time (restore or "
                                       "re-skip them: data.skip_corrupt=true), or start a new run")
            log.warning("resuming a changed stream: %s; the rest of this epoch is dealt in a new order over the "
                        "shards there are now (some samples of it repeat, others are not seen); from the next epoch "
                        "the stream is whole again", msg)
        order = state.get("order", "seek")
        if order == "seek":
            self.position = int(state["position"])
            if self.streamed:  # what the seek order had read is a prefix of every source's stream
                done = Mixture(self.weights, self.seed).counts(self.position)
                self._lanes = {"gen": 1, "layout": self._layout(), "consumed": done,
                               "base": [lanes_from_position(p, ds.order(self.seed, self.shuffle), self.readers)
                                        for p, ds in zip(done, self.datasets)]}
                self._batches_done = 0
        elif not self.streamed:
            raise DataError(where, "loader state was saved while streaming shards (data.read=stream, or shards at "
                                   "URLs): set data.read=stream to resume it")
        else:
            lanes = {k: v for k, v in state["lanes"].items() if k != "batches"}
            n = int(state["lanes"]["batches"])
            self.position = int(state["position"])
            if lanes["layout"] == self._layout():
                self._lanes, self._batches_done = lanes, n
            else:
                self._lanes, self._batches_done = self._relayout(lanes, n), 0
        self._generation += 1

    def _relayout(self, lanes: dict, n: int) -> dict:
        """Every source's unread units, n batches after `lanes`' plan, dealt over this layout."""
        taken = self._lane_taken(lanes, n)
        base = []
        for j, ds in enumerate(self.datasets):
            plan = advance_lanes(lanes["base"][j], taken[j], ds.order(self.seed, self.shuffle))
            base.append(redeal_lanes(plan, self.readers))
        log.info("data: lanes re-dealt from %s to %s (data-parallel size, workers, micro batch)",
                 lanes["layout"], self._layout())
        return {"gen": lanes["gen"] + 1, "layout": self._layout(), "base": base,
                "consumed": [c + sum(t) for c, t in zip(lanes["consumed"], taken)]}


def _check_mixable(datasets: list[TokenDataset]) -> None:
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.manifest.seq_len != first.manifest.seq_len:
            raise DataError(ds.manifest.path, f"seq_len {ds.manifest.seq_len} differs from {first.manifest.seq_len} "
                                              f"of {first.manifest.path}; a mixture needs one seq_len")
        if ds.manifest.tokenizer["fingerprint"] != first.manifest.tokenizer["fingerprint"]:
            raise DataError(ds.manifest.path, f"was tokenized with another tokenizer than {first.manifest.path}; "
                                              "a mixture needs one tokenizer (prepare every source with the same "
                                              "--tokenizer)")


# ---- from a config ----


def config_sources(cfg) -> list[tuple[str, float, str]]:
    """(location, weight, name) of every source of a DataConfig: data.sources, else data.dataset_dir."""
    if not cfg.sources:
        return [(str(cfg.dataset_dir), 1.0, "")]
    return [(s.dir or s.url, float(s.weight), s.name) for s in cfg.sources]


def _policy(cfg) -> remote.FetchPolicy:
    return remote.FetchPolicy(cfg.fetch_retries, cfg.fetch_backoff_s)


def split_manifests(cfg, split: str) -> list[tuple[Manifest, float, str]]:
    """The sources of a config that have samples in `split`, with their manifests."""
    out = []
    for loc, weight, name in config_sources(cfg):
        m = load_manifest(loc, _policy(cfg))
        if m.data["splits"].get(split, {}).get("samples"):
            out.append((m, weight, name))
    return out


def dataset_tokenizer(cfg):
    """(vocabulary size, location, Tokenizer) of the tokenizer a config's data was made with (every
    source of a mixture has the same one; the loader checks)."""
    from tokenizers import Tokenizer

    m = load_manifest(config_sources(cfg)[0][0], _policy(cfg))
    loc = cfg.tokenizer or m.locate(m.tokenizer["file"])
    try:
        tokenizer = Tokenizer.from_str(remote.read_text(loc, _policy(cfg), "tokenizer"))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception for malformed files
        raise DataError(loc, f"not a tokenizers JSON file: {e}") if not isinstance(e, DataError) else e from None
    return m.tokenizer["vocab_size"], loc, tokenizer


def build_loader(cfg, batch_size: int, split: str = "train", *, rank: int | None = None,
                 world_size: int | None = None, group=None, epochs: int | None = None,
                 shuffle: bool | None = None) -> StreamingLoader:
    """Loader from a DataConfig. Train streams forever, shuffled per cfg.shuffle; val defaults to
    one pass in stored order. A mixture's sources without samples in a val split are left out of it."""
    sources = split_manifests(cfg, split) if split != "train" else [
        (load_manifest(loc, _policy(cfg)), w, n) for loc, w, n in config_sources(cfg)]
    if not sources:
        raise DataError(config_sources(cfg)[0][0], f"no source has a {split!r} split")
    datasets = [TokenDataset(m, split, seq_len=cfg.seq_len, tokenizer=cfg.tokenizer or None, verify=cfg.verify,
                             skip_corrupt=cfg.skip_corrupt, fetch=_policy(cfg), name=name or None)
                for m, _, name in sources]
    if split != "train":
        epochs = 1 if epochs is None else epochs
        shuffle = False if shuffle is None else shuffle
    return StreamingLoader(
        datasets, batch_size, weights=[w for _, w, _ in sources], read=cfg.read, seed=cfg.seed,
        shuffle=cfg.shuffle if shuffle is None else shuffle, rank=rank, world_size=world_size, group=group,
        num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, pin_memory=cfg.pin_memory, epochs=epochs,
        read_ahead=cfg.read_ahead)
