"""Routed attention entry points: autograd over the Triton kernels, and dispatch between them and the
torch reference.

backend="auto" runs Triton for CUDA tensors (when triton is installed) and the reference otherwise;
"triton" forces the kernels, which on CPU tensors needs TRITON_INTERPRET=1 (the tests' route);
"torch" forces the reference. backend=None (what the model passes) takes the process-wide choice,
"auto" unless changed with `with attention_backend(...)`.
"""

from __future__ import annotations

import contextlib

import torch

from .reference import routed_attention_reference, routed_attention_varlen_reference
from .segments import Segments
from .triton_env import interpreting, triton_available

_BACKENDS = ("auto", "triton", "torch")
_current = ["auto"]


@contextlib.contextmanager
def attention_backend(name: str):
    """Run every routed attention call that names no backend (the model's) on `name` for a while."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    before, _current[0] = _current[0], name
    try:
        yield
    finally:
        _current[0] = before


def _use_triton(q: torch.Tensor, backend: str | None) -> bool:
    backend = _current[0] if backend is None else backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return q.is_cuda and triton_available()
    if not q.is_cuda and not interpreting():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 before the first Triton call")
    return True


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensors' one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _RoutedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, seg: Segments, scale: float):
        # Imported here, not at module import: Triton fixes compiled-vs-interpreted when it decorates.
        from .attention_fwd import attention_fwd

        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        if seg.packed:
            out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        else:
            # Written token-major, (B, T, H, D), so the caller's merge of heads is a free view.
            b, h, t, d = q.shape
            out = q.new_zeros(b, t, h, d).transpose(1, 2)
        with _on_device(q):
            lse, slb, slh = attention_fwd(q, k, v, q_pos, k_pos, seg, scale, out)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos)
        ctx.seg, ctx.scale, ctx.lse_strides = seg, scale, (slb, slh)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .attention_bwd import attention_bwd

        q, k, v, out, lse, q_pos, k_pos = ctx.saved_tensors
        # Rows outside every sequence (padding) are not written by the kernels: they must read 0.
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        with _on_device(q):
            attention_bwd(_last_dim_contiguous(grad_out), q, k, v, out, lse, ctx.lse_strides, q_pos, k_pos,
                          ctx.seg, ctx.scale, dq, dk, dv)
        return dq, dk, dv, None, None, None, None


def routed_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal-by-position grouped-query attention over packed ragged sequences.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_q/k: (B+1,) int, starting at 0 and ending
    at total; q_pos/k_pos: (total,) original positions. On the Triton path k_pos must ascend within each
    sequence; q_pos may be in any order (ascending is faster in the backward). Key j is visible to query
    i of the same sequence iff k_pos[j] <= q_pos[i]; a query seeing no key gets 0.
    max_seqlen_q/k bound the per-sequence lengths; passing them avoids a device-to-host sync.
    Returns (total_q, Hq, D).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not _use_triton(q, backend):
        return routed_attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, scale=scale)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.numel() > 1 else 0
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.numel() > 1 else 0
    seg = Segments.from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_pos)
    return _RoutedAttentionFn.apply(q, k, v, q_pos, k_pos, seg, scale)


def _valid_first(pos: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row slot order putting valid slots first, by position, and the count of valid slots."""
    key = torch.where(valid, pos, torch.iinfo(pos.dtype).max)
    return torch.argsort(key, dim=1, stable=True), valid.sum(dim=1, dtype=torch.int32)


def _gather_slots(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x[b, :, order[b, i]] for a head tensor (B, H, T, D)."""
    b, h, _, d = x.shape
    return x.gather(2, order[:, None, :, None].expand(b, h, order.shape[1], d))


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None = None,
    same_tokens: bool = False,
    q_valid: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Padded-layout routed attention with routed_attention_reference's arguments and semantics.

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D); q_pos (B, Tq), k_pos (B, Tk) original positions.
    k_valid (B, Tk) marks real key slots. q_valid (B, Tq) marks real query slots; it defaults to k_valid
    with same_tokens (queries and keys are the same slots), else to all valid. The output of a query
    slot that is not valid is unspecified (0 from Triton, finite garbage from the reference).

    On the Triton path, tensors with no mask are read in place: key positions must then ascend along T
    (expert-choice gathers and recursion-1 keys do), query positions may be in any order. Masked rows
    are first reordered valid-first by position, which accepts any slot order.
    """
    if not _use_triton(q, backend):
        return routed_attention_reference(q, k, v, q_pos, k_pos, k_valid, same_tokens)
    if same_tokens and q_valid is None:
        q_valid = k_valid
    bsz, _, t_q, _ = q.shape
    t_k = k.shape[2]

    k_len = torch.full((bsz,), t_k, dtype=torch.int32, device=q.device)
    if k_valid is not None:
        k_order, k_len = _valid_first(k_pos, k_valid)
        k, v, k_pos = _gather_slots(k, k_order), _gather_slots(v, k_order), k_pos.gather(1, k_order)
    q_order, q_len = None, torch.full((bsz,), t_q, dtype=torch.int32, device=q.device)
    if q_valid is not None:
        q_order, q_len = (k_order, k_len) if q_valid is k_valid else _valid_first(q_pos, q_valid)
        q, q_pos = _gather_slots(q, q_order), q_pos.gather(1, q_order)

    seg = Segments.from_lengths(q_len, k_len, t_q, t_k, q_pos)
    out = _RoutedAttentionFn.apply(q, k, v, q_pos, k_pos, seg, q.shape[-1] ** -0.5)
    if q_order is None:
        return out
    inverse = torch.empty_like(q_order).scatter_(
        1, q_order, torch.arange(t_q, device=q.device).expand(bsz, t_q).contiguous()
    )
    return _gather_slots(out, inverse)
