"""Attention over a paged KV cache (inference), torch path.

The cache of one attention call site is a pool of fixed-size pages, `k_pool, v_pool: (pages, P, Hkv,
D)`, with the original position of every entry in `pos_pool: (pages, P)`. A row (a request, or a
(request, depth) pair under recursion-wise caching) owns a list of pages, `table: (rows, max_pages)`,
and `length: (rows,)` entries in them. Attention of n query rows reads the first `width` pages of
each row, causal by original position, with the entries past the row's length masked out.

On a GPU (backend "auto", as routed attention) the Triton kernel of paged_triton.py reads the pages
in place. The torch path (CPU) gathers them into one (n, Hkv, width * P, D) block per call and hands
it to scaled_dot_product_attention; the pool itself is never copied or resized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    pos_pool: torch.Tensor,
    pages: torch.Tensor,
    length: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """q: (n, Hq, t, D) at original positions q_pos (n, t); pages: (n, W) page ids of each query row's
    first W pages; length: (n,) valid entries of each row. Key j of a row is visible to query i iff
    j < length and its position <= q_pos[i]. A query that sees no key gets finite garbage (torch) or
    0 (Triton); callers mask such rows. backend: as routed_attention's. Returns (n, Hq, t, D)."""
    from .routed_attention import _use_triton

    with torch.profiler.record_function("mor::paged_attention"):  # for bench/inference.py's overhead share
        if _use_triton(q, backend):
            from .paged_triton import paged_attention_triton

            return paged_attention_triton(q, q_pos, k_pool, v_pool, pos_pool, pages, length)
        return _paged_attention(q, q_pos, k_pool, v_pool, pos_pool, pages, length)


def _paged_attention(q, q_pos, k_pool, v_pool, pos_pool, pages, length):
    n, w = pages.shape
    p = k_pool.shape[1]
    # index_select on the flat page list: the same gather as pool[pages], several times faster on
    # CPU (advanced indexing of a 2-D index was a third of a decode step's attention time).
    flat = pages.reshape(-1)
    k = k_pool.index_select(0, flat).view(n, w * p, *k_pool.shape[2:]).transpose(1, 2)  # (n, Hkv, W*P, D)
    v = v_pool.index_select(0, flat).view(n, w * p, *v_pool.shape[2:]).transpose(1, 2)
    k_pos = pos_pool.index_select(0, flat).view(n, w * p)
    k_valid = torch.arange(w * p, device=length.device)[None, :] < length[:, None]
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # (n, t, W*P)
    # A row with no visible key would give NaN (softmax over nothing): let it see everything instead.
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None],
                                          enable_gqa=q.shape[1] != k.shape[1])
