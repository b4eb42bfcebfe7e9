"""Triton forward of routed attention: flash attention over ragged sequences, causal by original position.

One program owns BLOCK_M query rows of one sequence and one query head, and streams that sequence's
keys in BLOCK_N blocks with an online softmax. Key k is visible to query q iff k_pos <= q_pos. Key
positions ascend within a sequence, so the visible keys of a query block are a prefix of the keys:
blocks wholly at or before the block's lowest query position run without the mask, blocks up to its
highest run with it, later blocks are never loaded (queries may come in any order). Grouped-query heads
read kv head h // group.

The logsumexp saved for the backward is in base 2 (exp2 is the native instruction), +inf for a query
that sees no key (its output is 0 and it gets no gradient).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .segments import Segments
from .triton_env import check_mode, configs, dot_precision, interpreting, pow2_at_least

# (BLOCK_M, BLOCK_N, num_warps, num_stages); configs that do not fit are dropped by the autotuner.
_GPU_CONFIGS = [
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 3),
]


@triton.jit
def dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter's bf16 dot is wrong (triton-lang/triton#11584): it computes in fp32 instead.
    if DOT_FP32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        r = tl.dot(a, b, input_precision=PRECISION)
    return r


@triton.jit
def key_range(q_pos, row_ok, KPOS, len_k, stride_pkt, MAX_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [0, n_full) are visible to every query of the block (no mask needed); keys from n_hi on to
    none. Both are multiples of BLOCK_N, found from the key positions at the key-block boundaries in
    one vector load each (keys ascend). The queries may come in any order."""
    q_lo = tl.min(tl.where(row_ok, q_pos, 2147483647), 0)
    q_hi = tl.max(tl.where(row_ok, q_pos, -1), 0)
    blk = tl.arange(0, MAX_K // BLOCK_N) * BLOCK_N
    first_ok = blk < len_k
    first_pos = tl.load(KPOS + blk * stride_pkt, mask=first_ok, other=0)
    n_hi = tl.sum((first_ok & (first_pos <= q_hi)).to(tl.int32), 0) * BLOCK_N
    last_ok = blk + BLOCK_N - 1 < len_k
    last_pos = tl.load(KPOS + (blk + BLOCK_N - 1) * stride_pkt, mask=last_ok, other=0)
    n_full = tl.sum((last_ok & (last_pos <= q_lo)).to(tl.int32), 0) * BLOCK_N
    return n_full, n_hi


@triton.jit
def _fwd_span(acc, m_i, l_i, q, q_pos, K, V, KPOS, lo, hi, len_k, stride_kt, stride_vt, stride_pk, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt_ptrs = K + offs_d[:, None] + cols[None, :] * stride_kt  # K^T tile (HEAD_DIM, BLOCK_N)
        v_ptrs = V + cols[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            col_ok = cols < len_k
            kt = tl.load(kt_ptrs, mask=col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        s = dot(q, kt, DOT_FP32, PRECISION) * qk_scale
        if MASKED:
            k_pos = tl.load(KPOS + cols * stride_pk, mask=col_ok, other=0)
            visible = col_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_FP32, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=configs(_GPU_CONFIGS), key=["HEAD_DIM", "MAX_Q", "MAX_K"])
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, QPOS, KPOS, Q_START, Q_END, K_START, K_END,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, stride_lb, stride_lh, stride_pqb, stride_pqt, stride_pkb, stride_pkt,
    group, qk_scale,
    HEAD_DIM: tl.constexpr, MAX_Q: tl.constexpr, MAX_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    q0 = tl.load(Q_START + b)
    len_q = tl.load(Q_END + b) - q0
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:  # also the whole story for an empty sequence: nothing to write
        return
    k0 = tl.load(K_START + b)
    len_k = tl.load(K_END + b) - k0
    kvh = h // group

    Q += b * stride_qb + h * stride_qh + q0.to(tl.int64) * stride_qt
    O += b * stride_ob + h * stride_oh + q0.to(tl.int64) * stride_ot
    K += b * stride_kb + kvh * stride_kh + k0.to(tl.int64) * stride_kt
    V += b * stride_vb + kvh * stride_vh + k0.to(tl.int64) * stride_vt
    QPOS += b * stride_pqb + q0.to(tl.int64) * stride_pqt
    KPOS += b * stride_pkb + k0.to(tl.int64) * stride_pkt
    LSE += b * stride_lb + h * stride_lh + q0

    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = tl.load(QPOS + rows * stride_pqt, mask=row_ok, other=0)

    n_full, n_hi = key_range(q_pos, row_ok, KPOS, len_k, stride_pkt, MAX_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _fwd_span(acc, m_i, l_i, q, q_pos, K, V, KPOS, 0, n_full, len_k, stride_kt, stride_vt,
                              stride_pkt, qk_scale, HEAD_DIM, BLOCK_N, False, DOT_FP32, PRECISION)
    acc, m_i, l_i = _fwd_span(acc, m_i, l_i, q, q_pos, K, V, KPOS, n_full, n_hi, len_k, stride_kt, stride_vt,
                              stride_pkt, qk_scale, HEAD_DIM, BLOCK_N, True, DOT_FP32, PRECISION)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(O + rows[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + rows, lse, mask=row_ok)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    d = q.shape[-1]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"Triton routed attention supports head dims 16, 32, 64, 128, not {d}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    hq, hkv = q.shape[1], k.shape[1]  # heads are dim 1 in both layouts
    if hq % hkv or v.shape[1] != hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv}, {v.shape[1]})")


def attention_fwd(q, k, v, q_pos, k_pos, seg: Segments, scale: float, out: torch.Tensor):
    """Runs the forward into `out` (same layout as q; rows outside every sequence are left as they
    are). Returns the base-2 logsumexp buffer and its strides, which the backward reads."""
    check_inputs(q, k, v)
    check_mode(_fwd_kernel, q)
    d = q.shape[-1]
    hq, hkv = q.shape[1], k.shape[1]  # heads are dim 1 in both layouts
    lse, slb, slh = seg.new_rowstat(q)
    grid = lambda meta: (triton.cdiv(seg.max_q, meta["BLOCK_M"]), seg.batch, hq)  # noqa: E731
    if seg.batch == 0 or seg.max_q == 0:
        return lse, slb, slh
    _fwd_kernel[grid](
        q, k, v, out, lse, q_pos, k_pos, seg.q_start, seg.q_end, seg.k_start, seg.k_end,
        *seg.strides(q), *seg.strides(k), *seg.strides(v), *seg.strides(out), slb, slh,
        *seg.pos_strides(q_pos), *seg.pos_strides(k_pos),
        hq // hkv, scale * math.log2(math.e),
        HEAD_DIM=d, MAX_Q=pow2_at_least(seg.max_q), MAX_K=pow2_at_least(seg.max_k),
        DOT_FP32=interpreting(), PRECISION=dot_precision(q.dtype),
    )
    return lse, slb, slh
