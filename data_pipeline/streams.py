"""The batch streams of one data-parallel rank, run in its DataLoader workers (or in-process): seek
order (PositionStream) and stream order (LaneStream, one _Lane per source); loader.py has the orders'
definitions and the state."""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import chain, count

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.order import Mixture, SampleOrder, lane_units

log = logging.getLogger("mor_dist.data")

_OPEN_SHARDS = 4  # open shards kept per reader in seek order


class _Stream(IterableDataset):
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
        raise NotImplementedError


def _batch(rows, keys, pos, src, skipped) -> dict:
    # Plain numpy crosses the worker queue pickled, which for batches this small is far cheaper than
    # torch's shared-memory tensor handoff; tensors are made in the consumer.
    return {"tokens": np.stack(rows), "keys": np.asarray(keys, dtype=np.int64),
            "positions": np.asarray(pos, dtype=np.int64), "source": np.asarray(src, dtype=np.int64),
            "skipped": skipped}


class PositionStream(_Stream):
    """Batches of one data-parallel rank in seek order, from global index `start`."""

    def __init__(self, datasets, weights, seed, shuffle, rank, world, start, stop, batch_size):
        self.datasets, self.weights, self.seed, self.shuffle = datasets, weights, seed, shuffle
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

    def _batches(self, w: int, k: int):
        mix = Mixture(self.weights, self.seed)
        orders = [ds.order(self.seed, self.shuffle) for ds in self.datasets]
        readers: dict = {}  # (source, shard) -> open shard
        warned: set = set()  # shards with a logged problem: one warning each, not one per sample
        positions = self._positions(w, k)
        try:
            while True:
                rows, keys, pos, src, skipped = [], [], [], [], 0
                for t in positions:
                    j, p = mix.locate(t)
                    shard, local = orders[j].locate(p)
                    ds = self.datasets[j]
                    try:
                        r = readers.get((j, shard))
                        if r is None:
                            if len(readers) >= _OPEN_SHARDS:
                                readers.pop(next(iter(readers))).close()
                            r = readers[(j, shard)] = ds.reader(shard)
                        arr = r.read(local)
                    except DataError as e:
                        if not ds.skip_corrupt:
                            raise
                        # Replaced by this worker's next sample so that batches stay full.
                        (log.debug if (j, shard) in warned else log.warning)("skipping sample at position %d: %s", p, e)
                        warned.add((j, shard))
                        skipped += 1
                        continue
                    rows.append(arr)
                    keys.append(r.first_key + local)
                    pos.append(p)
                    src.append(j)
                    if len(rows) == self.batch:
                        break
                if not rows:
                    return
                yield _batch(rows, keys, pos, src, skipped)
                if len(rows) < self.batch:
                    return
        finally:
            for r in readers.values():
                r.close()


class _Lane:
    """One reader's lane of one source: its units in order, skipping what was read before; the
    shard being read and the next `ahead` ones, fetched in background threads."""

    def __init__(self, ds, order: SampleOrder, plan: dict, g: int, taken: int, ahead: int):
        self.ds, self.order = ds, order
        units = lane_units(plan, g)
        for slot, skip in units:  # whole units already read are not fetched again
            avail = order.slot_size(slot) - skip
            if taken < avail:
                self._units = chain([(slot, skip + taken)], units)
                break
            taken -= avail
        self.ahead = ahead if not ds.seekable else 0
        self._pool = ThreadPoolExecutor(max(1, self.ahead), thread_name_prefix="fetch") if self.ahead else None
        self._queue: deque = deque()
        self.skipped = 0

    def _fill(self) -> None:
        while len(self._queue) < 1 + self.ahead:
            slot, skip = next(self._units)
            k, first = self.order.slot(slot)
            fut = self._pool.submit(self.ds.reader, k) if self._pool is not None else None
            self._queue.append((slot, skip, k, first, fut))

    def samples(self):
        """(tokens, key, position) in lane order; None for a sample skipped in skip mode."""
        try:
            while True:
                self._fill()
                slot, skip, k, first, fut = self._queue.popleft()
                self._fill()  # the next fetch starts before this shard is read
                try:
                    shard = fut.result() if fut is not None else self.ds.reader(k)
                except DataError as e:
                    if not self.ds.skip_corrupt:
                        raise
                    log.warning("skipping the rest of shard %s (%d samples): %s", self.ds.shards[k]["location"],
                                self.order.slot_size(slot) - skip, e)
                    for _ in range(self.order.slot_size(slot) - skip):
                        yield None
                    continue
                inner = self.order.inner(slot // self.order.num_shards, k)
                try:
                    for off in range(skip, len(inner)):
                        local = int(inner[off])
                        try:
                            arr = shard.read(local)
                        except DataError as e:
                            if not self.ds.skip_corrupt:
                                raise
                            log.warning("skipping sample: %s", e)
                            yield None
                            continue
                        yield arr, shard.first_key + local, first + off
                finally:
                    shard.close()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)


class LaneStream(_Stream):
    """Batches of one data-parallel rank in stream order; see the module docstring."""

    def __init__(self, datasets, weights, seed, shuffle, rank, world, readers_per_rank, batch_size, lanes: dict,
                 batches_done: int, read_ahead: int):
        self.datasets, self.weights, self.seed, self.shuffle = datasets, weights, seed, shuffle
        self.rank, self.world, self.k, self.batch = rank, world, readers_per_rank, batch_size
        self.lanes, self.n, self.read_ahead = lanes, batches_done, read_ahead

    def _batches(self, w_dl: int, k: int):
        w = (self.n + w_dl) % self.k  # the reader whose turn the rank's next batch w_dl is
        g = self.rank * self.k + w
        mix = Mixture(self.weights, self.seed, lane_mixture_stream(self.lanes["gen"], g))
        u = reader_batches(self.n, w, self.k) * self.batch
        taken = mix.counts(u)
        lanes = [_Lane(ds, ds.order(self.seed, self.shuffle), self.lanes["base"][j], g, taken[j], self.read_ahead)
                 for j, ds in enumerate(self.datasets)]
        its = [lane.samples() for lane in lanes]
        try:
            while True:
                rows, keys, pos, src, skipped = [], [], [], [], 0
                while len(rows) < self.batch:
                    j, _ = mix.locate(u)
                    u += 1
                    item = next(its[j])
                    if item is None:
                        skipped += 1
                        continue
                    rows.append(item[0])
                    keys.append(item[1])
                    pos.append(item[2])
                    src.append(j)
                yield _batch(rows, keys, pos, src, skipped)
        finally:
            for it in its:
                it.close()


def lane_mixture_stream(gen: int, g: int) -> int:
    """Reader g's mixture schedule; reader 0 of a run's first plan draws like the seek order."""
    return (gen << 20) | g


def reader_batches(n: int, w: int, k: int) -> int:
    """Batches reader w of k has built when its rank has consumed n (round-robin from reader 0)."""
    return max(0, -(-(n - w) // k))
