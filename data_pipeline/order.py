"""Sample orders, pure functions of the seed and the shard sizes (no I/O here).

SampleOrder: one source's single-reader stream. Slot s (s = 0, 1, ...) is shard perm_e[s % S] of
epoch e = s // S, its samples in a permutation drawn from (seed, e, shard); position p is sample
p % N of epoch p // N.

Mixture: which source each index of a weighted mixture takes. Indices come in blocks of about B;
block k holds round(k*B*w_j) - round((k-1)*B*w_j) entries of source j (so no source is ever more
than one sample off its share at a block boundary), in an order drawn from (seed, stream, k).
Both the source of index t and how many samples each source gave before t are computed directly.

Lanes (streamed reading): every reader owns whole shards. A lane plan is, per reader, a queue of
units [slot, skip] (the slot's samples from skip on), then fresh slots next_slot + g, + g + R, ...
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import reduce

import numpy as np

_MIX_TAG = 0x6D6978  # "mix": keeps mixture draws apart from the (seed, epoch, ...) shard draws


def rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


class SampleOrder:
    """Position or slot -> (shard k, sample within it) of one source. Caches the current epoch and
    shard, since a reader's positions only grow."""

    def __init__(self, sizes: np.ndarray, shard_ids: list[int], seed: int, shuffle: bool):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.sizes, self.ids, self.seed, self.shuffle = sizes, shard_ids, seed, shuffle
        self.n = int(sizes.sum())
        self.num_shards = len(sizes)
        self._epoch = -1
        self._epochs: dict[int, tuple] = {}  # a few recent epochs: lanes read neighbouring ones by turns
        self._inner_key = None

    def _set_epoch(self, e: int) -> None:
        if e != self._epoch:
            if e not in self._epochs:
                n = self.num_shards
                perm = rng(self.seed, e, 0).permutation(n) if self.shuffle else np.arange(n)
                if len(self._epochs) >= 4:
                    self._epochs.pop(next(iter(self._epochs)))
                self._epochs[e] = perm, np.cumsum(self.sizes[perm])
            self._perm, self._ends = self._epochs[e]
            self._epoch = e

    def inner(self, e: int, k: int) -> np.ndarray:
        """The order of shard k's samples in epoch e."""
        if self._inner_key != (e, k):
            size = int(self.sizes[k])
            self._inner = rng(self.seed, e, 1, self.ids[k]).permutation(size) if self.shuffle else np.arange(size)
            self._inner_key = (e, k)
        return self._inner

    def locate(self, p: int) -> tuple[int, int]:
        e, off = divmod(p, self.n)
        self._set_epoch(e)
        i = int(np.searchsorted(self._ends, off, side="right"))
        k = int(self._perm[i])
        local = off - int(self._ends[i] - self.sizes[k])
        return k, int(self.inner(e, k)[local]) if self.shuffle else local

    def slot(self, s: int) -> tuple[int, int]:
        """(shard, first position) of slot s."""
        e, i = divmod(s, self.num_shards)
        self._set_epoch(e)
        k = int(self._perm[i])
        return k, e * self.n + int(self._ends[i] - self.sizes[k])

    def slot_size(self, s: int) -> int:
        return int(self.sizes[self.slot(s)[0]])

    def slot_of(self, p: int) -> tuple[int, int]:
        """(slot, offset in it) of position p."""
        e, off = divmod(p, self.n)
        self._set_epoch(e)
        i = int(np.searchsorted(self._ends, off, side="right"))
        return e * self.num_shards + i, off - int(self._ends[i] - self.sizes[self._perm[i]])


class Mixture:
    """Index t of a weighted mixture -> (source j, its position in source j's stream); see the module
    docstring. One source is the identity."""

    def __init__(self, weights: list[float], seed: int, stream: int = 0):
        fr = [Fraction(str(w)) for w in weights]
        if not fr or min(fr) <= 0:
            raise ValueError(f"mixture weights must be > 0, got {weights}")
        total = sum(fr)
        fr = [f / total for f in fr]
        self.den = reduce(lambda a, b: a * b // math.gcd(a, b), (f.denominator for f in fr))
        self.num = [int(f * self.den) for f in fr]
        self.sources = len(fr)
        self.block_size = max(64, 2 * self.sources)  # > sources, so that no block is empty
        self.seed, self.stream = seed, stream
        self._block_key = -1

    def _cum(self, k: int) -> list[int]:
        """Entries of each source in blocks < k: round(k * B * w_j)."""
        kb2 = 2 * k * self.block_size
        return [(kb2 * n + self.den) // (2 * self.den) for n in self.num]

    def _find(self, t: int) -> int:
        k = t // self.block_size
        while k > 0 and sum(self._cum(k)) > t:
            k -= 1
        while sum(self._cum(k + 1)) <= t:
            k += 1
        return k

    def _block(self, k: int) -> None:
        if k != self._block_key:
            lo, hi = self._cum(k), self._cum(k + 1)
            ids = np.repeat(np.arange(self.sources), [b - a for a, b in zip(lo, hi)])
            ids = rng(self.seed, _MIX_TAG, self.stream, k).permutation(ids)
            rank = np.empty(len(ids), dtype=np.int64)  # each entry's index among its source's in the block
            for j in range(self.sources):
                at = np.flatnonzero(ids == j)
                rank[at] = np.arange(len(at))
            self._ids, self._rank, self._lo, self._start = ids, rank, lo, sum(lo)
            self._block_key = k

    def locate(self, t: int) -> tuple[int, int]:
        if self.sources == 1:
            return 0, t
        self._block(self._find(t))
        off = t - self._start
        j = int(self._ids[off])
        return j, self._lo[j] + int(self._rank[off])

    def counts(self, t: int) -> list[int]:
        """Samples each source gave to indices < t."""
        if self.sources == 1:
            return [t]
        self._block(self._find(t))
        off = t - self._start
        return [self._lo[j] + int(np.count_nonzero(self._ids[:off] == j)) for j in range(self.sources)]

    def end(self, limits: list[int]) -> int:
        """The first index that would take sample limits[j] of some source j: a finite pass (every
        source j holds limits[j] samples) covers the indices before it."""
        if self.sources == 1:
            return limits[0]
        best = None
        for j, n in enumerate(limits):
            lo, hi = 0, (n + 1) * self.den // self.num[j] + 2 * self.block_size + 1
            while lo < hi:  # smallest m with counts(m)[j] > n
                mid = (lo + hi) // 2
                if self.counts(mid)[j] > n:
                    hi = mid
                else:
                    lo = mid + 1
            best = lo - 1 if best is None else min(best, lo - 1)
        return best


# ---- lanes ----


def fresh_lanes(readers: int) -> dict:
    return {"lanes": [[] for _ in range(readers)], "next_slot": 0}


def lane_units(plan: dict, g: int):
    """Reader g's units (slot, skip), endless: its queue, then its fresh slots."""
    readers = len(plan["lanes"])
    for slot, skip in plan["lanes"][g]:
        yield slot, skip
    s = plan["next_slot"] + g
    while True:
        yield s, 0
        s += readers


def advance_lanes(plan: dict, taken: list[int], order: SampleOrder) -> dict:
    """The plan after reader g has taken taken[g] samples of its lane, same readers: each lane's
    queue becomes what it has not read yet, up to a new next_slot past every slot started."""
    readers = len(plan["lanes"])
    rest, started = [], []
    for g in range(readers):
        left, queue, fresh = taken[g], [], 0
        for i, (slot, skip) in enumerate(lane_units(plan, g)):
            is_fresh = i >= len(plan["lanes"][g])
            avail = order.slot_size(slot) - skip
            if left >= avail:
                left -= avail
                fresh += is_fresh
                continue
            if left > 0 or not is_fresh:
                queue.append([slot, skip + left])
                fresh += is_fresh and left > 0
            left = 0
            if is_fresh:
                break
        rest.append(queue)
        started.append(fresh)
    top = max(started)
    lanes = []
    for g in range(readers):
        queue = rest[g]
        have = {u[0] for u in queue}
        for i in range(started[g], top):  # fresh slots of this lane below the new next_slot, not begun
            slot = plan["next_slot"] + g + i * readers
            if slot not in have:
                queue.append([slot, 0])
        lanes.append(queue)
    return {"lanes": lanes, "next_slot": plan["next_slot"] + top * readers}


def redeal_lanes(plan: dict, readers: int) -> dict:
    """Every unread unit, in slot order, dealt round-robin to `readers` new lanes; fresh slots go on
    from the same next_slot. Nothing is read twice or left out."""
    units = sorted((u for lane in plan["lanes"] for u in lane), key=lambda u: u[0])
    lanes = [[] for _ in range(readers)]
    for i, u in enumerate(units):
        lanes[i % readers].append(list(u))
    return {"lanes": lanes, "next_slot": plan["next_slot"]}


def lanes_from_position(p: int, order: SampleOrder, readers: int) -> dict:
    """A plan whose lanes read exactly what follows position p of the single-reader stream."""
    slot, off = order.slot_of(p)
    return redeal_lanes({"lanes": [[[slot, off]]], "next_slot": slot + 1}, readers)
