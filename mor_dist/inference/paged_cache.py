"""Paged KV caches for decoding: fixed-size pages from one preallocated pool per attention call site.

The model's call sites fall into three groups, each with one page table shared by its call sites
(the same tokens write every layer of a group at once, so one table and one length per row serve
them all; each call site has its own K/V pool indexed by the same page ids):
- prefix: the unique first layers, a row per request;
- suffix: the unique last layers, a row per request (written when a token leaves the recursions,
  so it keeps lengths of its own);
- shared: the shared block's layers. Recursion-wise caching (MOR.md 5): a row per (request, depth),
  row = request * Nr + r, holding only the tokens that reached depth r; KV sharing: a row per
  request, written at recursion 1 and read at every depth.

The host owns the allocation (page lists, free list, lengths) and reserves pages before a call can
write; the device holds the page tables, lengths and positions, so appends and attention need no
device-to-host transfer. Memory held is the pages in use, counted by `nbytes()`. Page 0 of every
pool is a sink for the writes of masked tokens and never part of a row.
"""

from __future__ import annotations

import math

import torch

from mor_dist.kernels import paged_attention


class CacheFullError(RuntimeError):
    """The page pool cannot hold what a call would write (the engine preempts a request)."""


class PageGroup:
    def __init__(self, rows: int, sites: int, page_size: int, pages: int, max_len: int, n_kv: int, head_dim: int,
                 dtype, device):
        self.page_size, self.sites = page_size, sites
        self.max_pages = math.ceil(max_len / page_size)
        self.k = [torch.zeros(pages, page_size, n_kv, head_dim, dtype=dtype, device=device) for _ in range(sites)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.pos = torch.zeros(pages, page_size, dtype=torch.long, device=device)
        self.table = torch.zeros(rows, self.max_pages, dtype=torch.long, device=device)
        self.length = torch.zeros(rows, dtype=torch.long, device=device)
        # Host side: free pages, pages of each row, and each row's length (exact once settled; an
        # upper bound while a call that may write is in flight).
        self.free = list(range(pages - 1, 0, -1))
        self.owned: list[list[int]] = [[] for _ in range(rows)]
        self.len = [0] * rows

    # ------------------------------------------------------------------ host: allocation
    def reserve(self, rows, extra) -> None:
        """Room for `extra` more entries (an int, or one per row) in each of `rows`."""
        if not self.sites:
            return
        extra = [extra] * len(rows) if isinstance(extra, int) else list(extra)
        need = [math.ceil((self.len[r] + e) / self.page_size) - len(self.owned[r]) for r, e in zip(rows, extra)]
        total = sum(n for n in need if n > 0)
        if total > len(self.free):
            raise CacheFullError(f"KV pool needs {total} more pages, {len(self.free)} free")
        ri, si, pi = [], [], []
        for r, e, n in zip(rows, extra, need):
            if self.len[r] + e > self.max_pages * self.page_size:
                raise ValueError(f"cache row {r} would exceed {self.max_pages * self.page_size} entries (max_seq_len)")
            self.len[r] += e
            for _ in range(max(n, 0)):
                page = self.free.pop()
                ri.append(r)
                si.append(len(self.owned[r]))
                pi.append(page)
                self.owned[r].append(page)
        if pi:
            dev = self.table.device
            self.table[torch.tensor(ri, device=dev), torch.tensor(si, device=dev)] = torch.tensor(pi, device=dev)

    def settle(self, row: int, length: int) -> None:
        """The row's true length after a call (the device agrees): pages past it go back."""
        self.len[row] = length
        keep = math.ceil(length / self.page_size)
        while len(self.owned[row]) > keep:
            self.free.append(self.owned[row].pop())  # its table entry is past the length: never read

    def release(self, rows) -> None:
        for r in rows:
            self.free.extend(self.owned[r])
            self.owned[r], self.len[r] = [], 0
        if len(rows):
            idx = torch.tensor(list(rows), device=self.length.device)
            self.length[idx] = 0
            self.table[idx] = 0  # freed pages may go to other rows: this one now points at the sink

    def width(self, rows) -> int:
        """Pages to read for these rows (at least one)."""
        return max([1] + [len(self.owned[r]) for r in rows])

    def device_tensors(self) -> list[torch.Tensor]:
        """Everything of the group on the device: allocated once, never moved."""
        return [*self.k, *self.v, self.pos, self.table, self.length]

    def pages_in_use(self) -> int:
        return sum(len(o) for o in self.owned)

    def page_bytes(self) -> int:
        """Bytes one page holds over all of the group's call sites (K, V) and its positions."""
        kv = sum(2 * k[0].numel() * k.element_size() for k in self.k)
        return kv + self.pos[0].numel() * self.pos.element_size()

    def entry_bytes(self) -> int:
        """Bytes of one token's K and V at one call site."""
        k = self.k[0]
        return 2 * k.shape[2] * k.shape[3] * k.element_size()

    # ------------------------------------------------------------------ device: one call's writes
    def views(self, rows: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor | None, width: int,
              writes: bool = True) -> dict:
        """frame.cache for one call of the group's layers: n rows (n,) of new tokens at pos (n, t),
        those with keep (n, t) appending (None: all). Lengths and positions are updated here, once
        for all call sites; each layer then writes its K/V and attends (LayerView)."""
        call = _Call(self, rows, pos, keep, width, writes)
        return {j: LayerView(self, j, call) for j in range(self.sites)}


class _Call:
    def __init__(self, group: PageGroup, rows, pos, keep, width: int, writes: bool):
        self.writes = writes
        if writes:
            if keep is None:
                keep = torch.ones_like(pos, dtype=torch.bool)
            base = group.length[rows]
            at = base[:, None] + keep.long().cumsum(dim=1) - 1  # entry index of each kept token
            page_of = group.table[rows[:, None], (at // group.page_size).clamp(0, group.max_pages - 1)]
            self.page = torch.where(keep, page_of, 0)  # masked tokens write the sink page
            self.slot = torch.where(keep, at % group.page_size, 0)
            group.pos[self.page, self.slot] = pos
            group.length[rows] = base + keep.sum(dim=1)
        self.pages = group.table[rows, :width]
        self.length = group.length[rows]


class LayerView:
    """What Attention sees as frame.cache[key] (mor_dist/model/layers.py)."""

    def __init__(self, group: PageGroup, site: int, call: _Call):
        self.group, self.site, self.call = group, site, call
        self.writes = call.writes

    def append(self, k, v, pos, valid) -> None:
        """k, v: (n, Hkv, t, D) of the call's tokens (positions and validity were handled by _Call)."""
        c = self.call
        self.group.k[self.site][c.page, c.slot] = k.transpose(1, 2).to(self.group.k[self.site].dtype)
        self.group.v[self.site][c.page, c.slot] = v.transpose(1, 2).to(self.group.v[self.site].dtype)

    def attend(self, q, q_pos) -> torch.Tensor:
        g, c = self.group, self.call
        return paged_attention(q, q_pos, g.k[self.site], g.v[self.site], g.pos, c.pages, c.length)


class PagedKVCache:
    """The three page groups of `model` for `rows` requests; kv = "recursion_wise" or "share"."""

    def __init__(self, model, rows: int, kv: str | None = None, page_size: int = 16, pages: dict | None = None,
                 dtype=None, device=None):
        lay = model.layout
        self.kv = kv or model.kv_strategy
        if self.kv not in ("recursion_wise", "share"):
            raise ValueError(f"kv={self.kv!r} is not one of ('recursion_wise', 'share')")
        attn = (list(model.prefix) + list(model.shared) + list(model.suffix))[0].attn
        n_kv, hd = attn.wk.out_features // attn.head_dim, attn.head_dim
        dtype = dtype or attn.wk.weight.dtype
        device = device or attn.wk.weight.device
        self.rows, self.nr, self.page_size = rows, lay.recursions, page_size
        max_len = model.cfg.max_seq_len
        shared_rows = rows * self.nr if self.kv == "recursion_wise" else rows
        pages = pages or {}

        def group(name, n_rows, sites):
            # Default pool: every row full, plus the sink page (a bound, not what is held).
            n_pages = pages.get(name, n_rows * math.ceil(max_len / page_size) + 1) if sites else 1
            return PageGroup(n_rows, sites, page_size, n_pages, max_len, n_kv, hd, dtype, device)

        self.prefix = group("prefix", rows, lay.prefix)
        self.suffix = group("suffix", rows, lay.suffix)
        self.shared = group("shared", shared_rows, lay.block)

    def groups(self) -> list[PageGroup]:
        return [g for g in (self.prefix, self.suffix, self.shared) if g.sites]

    def shared_rows(self, request_rows, depth=None):
        """Row index of each request's shared cache at `depth` (recursion-wise; ignored for share)."""
        if self.kv == "share":
            return request_rows
        return request_rows * self.nr + depth

    def release(self, rows: list[int]) -> None:
        self.prefix.release(rows)
        self.suffix.release(rows)
        self.shared.release([r * self.nr + d for r in rows for d in range(self.nr)] if self.kv == "recursion_wise"
                            else rows)

    # ------------------------------------------------------------------ accounting (host)
    def entries(self) -> dict:
        """K/V entries held (each = one token at one call site)."""
        return {"unique": sum(sum(g.len) * g.sites for g in (self.prefix, self.suffix)),
                "shared": sum(self.shared.len) * self.shared.sites}

    def nbytes(self) -> int:
        """Bytes of the pages in use."""
        return sum(g.pages_in_use() * g.page_bytes() for g in self.groups())

    def entry_bytes(self) -> int:
        return self.groups()[0].entry_bytes() if self.groups() else 0
