"""KV caches for decoding: one store per attention call site, rows of per-sequence entries.

A KVStore holds, for each row, the K/V and original positions of the tokens that wrote to it, in
position order (append-only). Rows differ in length: under recursion-wise caching a deeper depth
holds only the tokens that reached it. Attention reads a set of rows padded to their longest one;
causality is by original position (kernels' routed_attention), so a chunk of new tokens may append
first and attend after.

ModelKVCache gathers the stores of a model for R request rows:
- unique (prefix / suffix) layers: one store each, a row per request -- an ordinary KV cache;
- shared layers, recursion-wise (MOR.md 5): a store per shared-layer slot j with a row per
  (request, depth), row = request * Nr + r, so that tokens of different requests at different depths
  still attend in one batched call;
- shared layers, KV sharing: a store per slot j with a row per request, written at recursion 1 only
  and read at every depth.
Stores are dense (rows x capacity) tensors that double when full; the bytes this module reports count
stored entries (what a paged allocator would hold), not the dense capacity.
"""

from __future__ import annotations

import torch

from mor_dist.kernels import routed_attention


class KVStore:
    def __init__(self, rows: int, n_kv_heads: int, head_dim: int, dtype, device, capacity: int = 16):
        self.rows = rows
        self.k = torch.zeros(rows, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(rows, capacity, dtype=torch.long, device=device)
        self.length = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        extra = cap - self.capacity
        self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:2], extra, self.k.shape[3])], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:2], extra, self.v.shape[3])], dim=2)
        self.pos = torch.cat([self.pos, self.pos.new_zeros(self.rows, extra)], dim=1)

    def append(self, rows, k, v, pos, keep=None) -> None:
        """Append each row's kept entries. rows: (n,) distinct; k, v: (n, Hkv, t, D); pos, keep: (n, t)."""
        n, _, t, _ = k.shape
        if keep is None:
            keep = torch.ones(n, t, dtype=torch.bool, device=k.device)
        count = keep.sum(dim=1)
        base = self.length[rows]
        need = int((base + count).max()) if n else 0
        if need > self.capacity:
            self._grow(need)
        dest = base[:, None] + keep.long().cumsum(dim=1) - 1  # (n, t) slot of each kept entry
        ri, ti = keep.nonzero(as_tuple=True)
        row_ids, slot = rows[ri], dest[ri, ti]
        self.k[row_ids, :, slot] = k[ri, :, ti].to(self.k.dtype)
        self.v[row_ids, :, slot] = v[ri, :, ti].to(self.v.dtype)
        self.pos[row_ids, slot] = pos[ri, ti]
        self.length[rows] = base + count

    def attend(self, rows, q, q_pos) -> torch.Tensor:
        """Causal attention of q (n, Hq, t, D) at q_pos (n, t) over the entries of `rows`."""
        lens = self.length[rows]
        width = max(int(lens.max()), 1)
        k, v, k_pos = self.k[rows, :, :width], self.v[rows, :, :width], self.pos[rows, :width]
        k_valid = torch.arange(width, device=lens.device)[None, :] < lens[:, None]
        return routed_attention(q, k.to(q.dtype), v.to(q.dtype), q_pos, k_pos, None if bool(k_valid.all()) else k_valid)

    def clear(self, rows) -> None:
        self.length[rows] = 0

    def entries(self) -> int:
        return int(self.length.sum())

    def entry_bytes(self) -> int:
        """Bytes of one token's K and V at this call site."""
        return 2 * self.k.shape[1] * self.k.shape[3] * self.k.element_size()


class CacheView:
    """One layer call's handle on a store (what Attention sees as frame.cache[key]).

    rows: (n,) store rows of the n sequences in the call; write: (n,) bool, which of them append
    their new K/V (KV sharing: only tokens at recursion 1), or None for all.
    """

    def __init__(self, store: KVStore, rows: torch.Tensor, write: torch.Tensor | None = None):
        self.store, self.rows, self.write = store, rows, write
        self.writes = write is None or bool(write.any())

    def append(self, k, v, pos, valid) -> None:
        keep = valid
        if self.write is not None:
            w = self.write[:, None].expand(pos.shape)
            keep = w if keep is None else keep & w
        self.store.append(self.rows, k, v, pos, keep)

    def attend(self, q, q_pos) -> torch.Tensor:
        return self.store.attend(self.rows, q, q_pos)


class ModelKVCache:
    """All KV stores of `model` for `rows` request rows; kv = "recursion_wise" or "share"."""

    def __init__(self, model, rows: int, kv: str | None = None, dtype=None, device=None, capacity: int = 16):
        lay = model.layout
        self.kv = kv or model.kv_strategy
        if self.kv not in ("recursion_wise", "share"):
            raise ValueError(f"kv={self.kv!r} is not one of ('recursion_wise', 'share')")
        attn = (list(model.prefix) + list(model.shared) + list(model.suffix))[0].attn
        n_kv, hd = attn.wk.out_features // attn.head_dim, attn.head_dim
        dtype = dtype or attn.wk.weight.dtype
        device = device or attn.wk.weight.device
        self.rows, self.nr = rows, lay.recursions

        def store(n):
            return KVStore(n, n_kv, hd, dtype, device, capacity)

        self.prefix = [store(rows) for _ in range(lay.prefix)]
        self.suffix = [store(rows) for _ in range(lay.suffix)]
        shared_rows = rows * self.nr if self.kv == "recursion_wise" else rows
        self.shared = [store(shared_rows) for _ in range(lay.block)]
        # Tokens each row has seen (all of them write the unique layers): the per-token denominator.
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ views for TokenFrame.cache
    def prefix_views(self, rows) -> dict:
        return {i: CacheView(s, rows) for i, s in enumerate(self.prefix)}

    def suffix_views(self, rows) -> dict:
        return {i: CacheView(s, rows) for i, s in enumerate(self.suffix)}

    def shared_views(self, rows, depth) -> dict:
        """Views for one recursion step; depth: 0-based step, an int or (n,) per row."""
        depth = torch.as_tensor(depth, device=rows.device).expand(rows.shape)
        if self.kv == "recursion_wise":
            srows, write = rows * self.nr + depth, None
        else:  # recursion 1 writes; every depth reads recursion 1's K/V
            srows, write = rows, depth == 0
        return {j: CacheView(s, srows, write) for j, s in enumerate(self.shared)}

    # ------------------------------------------------------------------ bookkeeping
    def clear(self, rows) -> None:
        rows = torch.as_tensor(rows, device=self.tokens.device)
        for s in self.prefix + self.suffix:
            s.clear(rows)
        srows = rows
        if self.kv == "recursion_wise":
            srows = (rows[:, None] * self.nr + torch.arange(self.nr, device=rows.device)).flatten()
        for s in self.shared:
            s.clear(srows)
        self.tokens[rows] = 0

    def entries(self) -> dict:
        """K/V entries held: unique layers and shared layers (each entry = one token at one call site)."""
        return {"unique": sum(s.entries() for s in self.prefix + self.suffix),
                "shared": sum(s.entries() for s in self.shared)}

    def nbytes(self) -> int:
        stores = self.prefix + self.suffix + self.shared
        return sum(s.entries() * s.entry_bytes() for s in stores)

    def bytes_per_token(self) -> float:
        n = int(self.tokens.sum())
        return self.nbytes() / n if n else 0.0
