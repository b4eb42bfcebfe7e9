"""Triton backward of routed attention (flash-attention-2 style, recomputing P from the saved logsumexp).

Three launches:
- delta = rowsum(dO * O) per query row and head;
- dK, dV: one program per (key block, sequence, kv head) walks the query rows that can see its keys,
  for every query head of the group in turn, so grouped-query gradients are summed in registers
  (no atomics, deterministic);
- dQ: one program per (query block, sequence, query head) walks the visible keys, as the forward.
When a sequence's query positions ascend, the query blocks that see none of a key block form a prefix
(skipped), then come blocks that need the causal mask, then blocks that see every key (no mask), then a
partial last block (masked). Sequences whose queries are out of order (Segments.q_ascending = 0) are
walked whole, masked: correct, just without the skips.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .attention_fwd import check_inputs, dot, key_range
from .segments import Segments
from .triton_env import configs, dot_precision, interpreting, pow2_at_least

# (BLOCK_M, BLOCK_N, num_warps, num_stages). dK/dV holds BLOCK_N keys and streams BLOCK_M queries;
# dQ holds BLOCK_M queries and streams BLOCK_N keys.
_DKDV_GPU_CONFIGS = [
    (32, 128, 8, 3),
    (64, 128, 8, 3),
    (32, 64, 4, 3),
    (64, 64, 4, 3),
]
_DQ_GPU_CONFIGS = [
    (128, 32, 8, 3),
    (128, 64, 8, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 3),
]
_DELTA_BLOCK = 64


@triton.jit
def _delta_kernel(O, DO, DELTA, Q_START, Q_END, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gt,
                  stride_lb, stride_lh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    q0 = tl.load(Q_START + b)
    len_q = tl.load(Q_END + b) - q0
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_d = tl.arange(0, HEAD_DIM)
    O += b * stride_ob + h * stride_oh + q0.to(tl.int64) * stride_ot
    DO += b * stride_gb + h * stride_gh + q0.to(tl.int64) * stride_gt
    o = tl.load(O + rows[:, None] * stride_ot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * stride_gt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + q0 + rows, delta, mask=row_ok)


@triton.jit
def _dkdv_span(dk, dv, k, v, k_pos, Q, DO, LSE, DELTA, QPOS, lo, hi, len_q, stride_qt, stride_gt, stride_pqt,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_ptrs = Q + rows[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = DO + rows[:, None] * stride_gt + offs_d[None, :]
        if MASKED:
            row_ok = rows < len_q
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + rows)
            delta = tl.load(DELTA + rows)
        # Transposed tiles (keys x queries) so dK and dV come out of plain dots.
        p_t = tl.math.exp2(dot(k, tl.trans(q), DOT_FP32, PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            q_pos = tl.load(QPOS + rows * stride_pqt, mask=row_ok, other=0)
            visible = row_ok[None, :] & (k_pos[:, None] <= q_pos[None, :])
            p_t = tl.where(visible, p_t, 0.0)
        dv += dot(p_t.to(do.dtype), do, DOT_FP32, PRECISION)
        dp_t = dot(v, tl.trans(do), DOT_FP32, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += dot(ds_t.to(q.dtype), q, DOT_FP32, PRECISION)
    return dk, dv


@triton.autotune(configs=configs(_DKDV_GPU_CONFIGS), key=["HEAD_DIM", "MAX_Q", "MAX_K"])
@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QPOS, KPOS, Q_START, Q_END, K_START, K_END, Q_ASC,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_gb, stride_gh, stride_gt, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    stride_lb, stride_lh, stride_pqb, stride_pqt, stride_pkb, stride_pkt,
    group, qk_scale, scale,
    HEAD_DIM: tl.constexpr, MAX_Q: tl.constexpr, MAX_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kvh = tl.program_id(2).to(tl.int64)
    k0 = tl.load(K_START + b)
    len_k = tl.load(K_END + b) - k0
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    q0 = tl.load(Q_START + b)
    len_q = tl.load(Q_END + b) - q0

    K += b * stride_kb + kvh * stride_kh + k0.to(tl.int64) * stride_kt
    V += b * stride_vb + kvh * stride_vh + k0.to(tl.int64) * stride_vt
    DK += b * stride_dkb + kvh * stride_dkh + k0.to(tl.int64) * stride_dkt
    DV += b * stride_dvb + kvh * stride_dvh + k0.to(tl.int64) * stride_dvt
    KPOS += b * stride_pkb + k0.to(tl.int64) * stride_pkt
    QPOS += b * stride_pqb + q0.to(tl.int64) * stride_pqt
    Q += b * stride_qb + q0.to(tl.int64) * stride_qt
    DO += b * stride_gb + q0.to(tl.int64) * stride_gt
    LSE += b * stride_lb + q0
    DELTA += b * stride_lb + q0

    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < len_k
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    k_pos = tl.load(KPOS + cols * stride_pkt, mask=col_ok, other=0)

    k_first = tl.load(KPOS + n0 * stride_pkt)
    k_last = tl.load(KPOS + (tl.minimum(n0 + BLOCK_N, len_k) - 1) * stride_pkt)
    blk = tl.arange(0, MAX_Q // BLOCK_M) * BLOCK_M
    blk_ok = blk < len_q
    blk_last = tl.load(QPOS + (tl.minimum(blk + BLOCK_M, len_q) - 1) * stride_pqt, mask=blk_ok, other=0)
    blk_first = tl.load(QPOS + blk * stride_pqt, mask=blk_ok, other=0)
    lo = tl.sum((blk_ok & (blk_last < k_first)).to(tl.int32), 0) * BLOCK_M
    mid = tl.maximum(tl.sum((blk_ok & (blk_first < k_last)).to(tl.int32), 0) * BLOCK_M, lo)
    # Queries out of position order (padding slots of a gathered row): walk them all, masked.
    ascending = tl.load(Q_ASC + b) != 0
    lo = tl.where(ascending, lo, 0)
    mid = tl.where(ascending, mid, len_q)
    tail = tl.maximum(mid, (len_q // BLOCK_M) * BLOCK_M)

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    for g in range(0, group):
        h = kvh * group + g
        Qh = Q + h * stride_qh
        DOh = DO + h * stride_gh
        LSEh = LSE + h * stride_lh
        DELTAh = DELTA + h * stride_lh
        dk, dv = _dkdv_span(dk, dv, k, v, k_pos, Qh, DOh, LSEh, DELTAh, QPOS, lo, mid, len_q, stride_qt,
                            stride_gt, stride_pqt, qk_scale, HEAD_DIM, BLOCK_M, True, DOT_FP32, PRECISION)
        dk, dv = _dkdv_span(dk, dv, k, v, k_pos, Qh, DOh, LSEh, DELTAh, QPOS, mid, tail, len_q, stride_qt,
                            stride_gt, stride_pqt, qk_scale, HEAD_DIM, BLOCK_M, False, DOT_FP32, PRECISION)
        dk, dv = _dkdv_span(dk, dv, k, v, k_pos, Qh, DOh, LSEh, DELTAh, QPOS, tail, len_q, len_q, stride_qt,
                            stride_gt, stride_pqt, qk_scale, HEAD_DIM, BLOCK_M, True, DOT_FP32, PRECISION)
    dk *= scale
    tl.store(DK + cols[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + cols[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_span(dq, q, do, lse, delta, q_pos, K, V, KPOS, lo, hi, len_k, stride_kt, stride_vt, stride_pkt, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = K + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + cols[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            col_ok = cols < len_k
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        p = tl.math.exp2(dot(q, tl.trans(k), DOT_FP32, PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            k_pos = tl.load(KPOS + cols * stride_pkt, mask=col_ok, other=0)
            visible = col_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            p = tl.where(visible, p, 0.0)
        dp = dot(do, tl.trans(v), DOT_FP32, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, DOT_FP32, PRECISION)
    return dq


@triton.autotune(configs=configs(_DQ_GPU_CONFIGS), key=["HEAD_DIM", "MAX_Q", "MAX_K"])
@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, QPOS, KPOS, Q_START, Q_END, K_START, K_END,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_gb, stride_gh, stride_gt, stride_dqb, stride_dqh, stride_dqt,
    stride_lb, stride_lh, stride_pqb, stride_pqt, stride_pkb, stride_pkt,
    group, qk_scale, scale,
    HEAD_DIM: tl.constexpr, MAX_Q: tl.constexpr, MAX_K: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    q0 = tl.load(Q_START + b)
    len_q = tl.load(Q_END + b) - q0
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    k0 = tl.load(K_START + b)
    len_k = tl.load(K_END + b) - k0
    kvh = h // group

    Q += b * stride_qb + h * stride_qh + q0.to(tl.int64) * stride_qt
    DO += b * stride_gb + h * stride_gh + q0.to(tl.int64) * stride_gt
    DQ += b * stride_dqb + h * stride_dqh + q0.to(tl.int64) * stride_dqt
    K += b * stride_kb + kvh * stride_kh + k0.to(tl.int64) * stride_kt
    V += b * stride_vb + kvh * stride_vh + k0.to(tl.int64) * stride_vt
    QPOS += b * stride_pqb + q0.to(tl.int64) * stride_pqt
    KPOS += b * stride_pkb + k0.to(tl.int64) * stride_pkt
    LSE += b * stride_lb + h * stride_lh + q0
    DELTA += b * stride_lb + h * stride_lh + q0

    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * stride_gt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    q_pos = tl.load(QPOS + rows * stride_pqt, mask=row_ok, other=0)

    n_full, n_hi = key_range(q_pos, row_ok, KPOS, len_k, stride_pkt, MAX_K, BLOCK_N)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    dq = _dq_span(dq, q, do, lse, delta, q_pos, K, V, KPOS, 0, n_full, len_k, stride_kt, stride_vt, stride_pkt,
                  qk_scale, HEAD_DIM, BLOCK_N, False, DOT_FP32, PRECISION)
    dq = _dq_span(dq, q, do, lse, delta, q_pos, K, V, KPOS, n_full, n_hi, len_k, stride_kt, stride_vt, stride_pkt,
                  qk_scale, HEAD_DIM, BLOCK_N, True, DOT_FP32, PRECISION)
    dq *= scale
    tl.store(DQ + rows[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def attention_bwd(do, q, k, v, o, lse, lse_strides, q_pos, k_pos, seg: Segments, scale: float, dq, dk, dv):
    """Writes dQ, dK, dV (same layouts as q, k, v) for the rows inside sequences; other rows are left
    as they are."""
    check_inputs(q, k, v)
    if seg.batch == 0:
        return
    d = q.shape[-1]
    hq, hkv = q.shape[1], k.shape[1]
    slb, slh = lse_strides
    delta, _, _ = seg.new_rowstat(q)  # same shape as lse, hence the same strides
    consts = dict(HEAD_DIM=d, MAX_Q=pow2_at_least(seg.max_q), MAX_K=pow2_at_least(seg.max_k),
                  DOT_FP32=interpreting(), PRECISION=dot_precision(q.dtype))
    if seg.max_q > 0:
        _delta_kernel[(triton.cdiv(seg.max_q, _DELTA_BLOCK), seg.batch, hq)](
            o, do, delta, seg.q_start, seg.q_end, *seg.strides(o), *seg.strides(do), slb, slh,
            HEAD_DIM=d, BLOCK_M=_DELTA_BLOCK,
        )
    common = (*seg.strides(q), *seg.strides(k), *seg.strides(v), *seg.strides(do))
    positions = (*seg.pos_strides(q_pos), *seg.pos_strides(k_pos))
    group, qk_scale = hq // hkv, scale * math.log2(math.e)
    if seg.max_k > 0:
        # Every program of a key block inside a sequence writes its rows (zeros when no query sees them).
        _dkdv_kernel[lambda meta: (triton.cdiv(seg.max_k, meta["BLOCK_N"]), seg.batch, hkv)](
            q, k, v, do, dk, dv, lse, delta, q_pos, k_pos, seg.q_start, seg.q_end, seg.k_start, seg.k_end,
            seg.q_ascending, *common, *seg.strides(dk), *seg.strides(dv), slb, slh, *positions,
            group, qk_scale, scale, **consts,
        )
    if seg.max_q > 0:
        _dq_kernel[lambda meta: (triton.cdiv(seg.max_q, meta["BLOCK_M"]), seg.batch, hq)](
            q, k, v, do, dq, lse, delta, q_pos, k_pos, seg.q_start, seg.q_end, seg.k_start, seg.k_end,
            *common, *seg.strides(dq), slb, slh, *positions,
            group, qk_scale, scale, **consts,
        )
