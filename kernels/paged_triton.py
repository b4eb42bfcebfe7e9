"""Triton attention over a paged KV cache: the pages are read in place, never gathered.

One program owns BLOCK_M queries of one cache row and one query head. It walks the row's pages in
table order (a page = one key block of PAGE entries), loads each page's K, V and positions straight
from the pools, and keeps an online softmax. Key j of the row is visible to query i iff j < length
and pos[j] <= q_pos[i]; a query that sees no key gets 0. Grouped-query heads read kv head h // group.
Forward only (inference). Same arguments and results as paged.py's torch path, which the tests
compare it with (tests/kernels/test_paged.py, under the interpreter on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_env import check_mode, dot_precision, interpreting


class _Tuned:
    """check_mode looks at `.fn` (an autotuner's kernel); this kernel is not autotuned."""

    def __init__(self, kernel):
        self.fn = kernel


@triton.jit
def _paged_fwd(Q, QPOS, KP, VP, PP, TABLE, LEN, OUT, t, n_pages, qk_scale,
               stride_qn, stride_qh, stride_qt, stride_qpn, stride_tn,
               stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
               stride_on, stride_oh, stride_ot,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    row, head, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh = head // GROUP
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, PAGE)
    m_ok = offs_m < t
    q = tl.load(Q + row * stride_qn + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    q_pos = tl.load(QPOS + row * stride_qpn + offs_m, mask=m_ok, other=-1)
    length = tl.load(LEN + row)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for j in range(0, n_pages):
        page = tl.load(TABLE + row * stride_tn + j).to(tl.int64)  # an int32 table: page * stride may pass 2^31
        idx = j * PAGE + offs_s
        k_ok = idx < length
        k_pos = tl.load(PP + page * PAGE + offs_s, mask=k_ok, other=2147483647)
        kt = tl.load(KP + page * stride_kp + offs_s[None, :] * stride_ks + kvh * stride_kh + offs_d[:, None],
                     mask=k_ok[None, :], other=0.0)
        v = tl.load(VP + page * stride_vp + offs_s[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                    mask=k_ok[:, None], other=0.0)
        if DOT_FP32:  # the interpreter's low-precision dot is not exact (see attention_fwd.py)
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32))
        else:
            s = tl.dot(q, kt, input_precision=PRECISION)
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            pv = tl.dot(p, v.to(tl.float32))
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(OUT + row * stride_on + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None])


def paged_attention_triton(q, q_pos, k_pool, v_pool, pos_pool, pages, length) -> torch.Tensor:
    """paged.paged_attention's contract on the Triton kernel. Page size and head dim: powers of two,
    at least 16 (tensor-core tiles)."""
    check_mode(_Tuned(_paged_fwd), q)
    n, hq, t, d = q.shape
    page, hkv = k_pool.shape[1], k_pool.shape[2]
    if page < 16 or page & (page - 1) or d < 16 or d & (d - 1):
        raise ValueError(f"Triton paged attention needs page size and head dim powers of two >= 16, got {page}, {d}")
    if any(x.stride(-1) != 1 for x in (q, k_pool, v_pool)):  # the kernel steps along head_dim by 1
        raise ValueError("Triton paged attention needs q, k_pool and v_pool contiguous in their last dim")
    out = torch.empty_like(q)
    block_m = 16 if t <= 16 or interpreting() else 64
    grid = (n, hq, triton.cdiv(t, block_m))
    pages = pages.contiguous()
    length = length.to(torch.int32).contiguous()
    pos_flat = pos_pool.contiguous()  # read as stored (int64): converting would copy the pool every call
    q_pos = q_pos.to(torch.int32).contiguous()
    scale = d ** -0.5 * 1.4426950408889634  # log2(e): the kernel's softmax is in base 2
    _paged_fwd[grid](
        q, q_pos, k_pool, v_pool, pos_flat, pages, length, out, t, pages.shape[1], scale,
        q.stride(0), q.stride(1), q.stride(2), q_pos.stride(0), pages.stride(0),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=hq // hkv, HEAD_DIM=d, PAGE=page, BLOCK_M=block_m,
        DOT_FP32=interpreting() and q.dtype != torch.float32, PRECISION=dot_precision(q.dtype),
    )
    return out
