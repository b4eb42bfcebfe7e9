"""Plain-torch routed attention: the CPU path of the model and the reference the Triton kernels are
tested against.

Layout is "padded": each sequence of the batch holds up to K gathered tokens (its active tokens, in
original order), described by their original positions and a validity mask. Causality is by original
position, so a gathered token attends exactly to the earlier gathered tokens it would have seen in the
full sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def routed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None = None,
    same_tokens: bool = False,
) -> torch.Tensor:
    """Causal grouped-query attention by original position.

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D) with Hq a multiple of Hkv.
    q_pos: (B, Tq), k_pos: (B, Tk) original positions, ascending along the last dim for valid slots.
    k_valid: (B, Tk) bool, False for padding slots; None means all valid.
    same_tokens: queries and keys are the same gathered tokens (recursion-wise attention) and all are
        valid, so position order equals index order and the plain causal kernel applies.

    Query slots that see no valid key (padding) get finite garbage; callers discard them.
    """
    if same_tokens and k_valid is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    mask = k_pos[:, None, :] <= q_pos[:, :, None]  # (B, Tq, Tk)
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    # A row with no allowed key would give NaN (softmax of all -inf) and poison the backward pass
    # even though the row is discarded; let such rows attend everywhere instead.
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1]
    )


def routed_attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention by original position over packed ragged sequences.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); cu_seqlens_q, cu_seqlens_k: (B+1,) cumulative
    lengths starting at 0; q_pos: (total_q,), k_pos: (total_k,) original positions.
    Recursion-wise attention passes the same token set as queries and keys; KV-sharing passes the
    active tokens as queries and all recursion-1 tokens as keys. Key j is visible to query i of the
    same sequence iff k_pos[j] <= q_pos[i]; a query that sees no key gets 0 (and no gradient).
    """
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert cq[0] == 0 and cq[-1] == q.shape[0] and ck[0] == 0 and ck[-1] == k.shape[0], "cu_seqlens must span q, k"
    gqa = q.shape[1] != k.shape[1]
    pieces = []
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        n_q = cq[b + 1] - cq[b]
        if n_q == 0:
            continue
        visible = k_pos[ks][None, :] <= q_pos[qs][:, None]  # (n_q, n_k)
        seen = visible.any(dim=-1)
        if ck[b + 1] == ck[b]:
            pieces.append(q[qs] * 0)
            continue
        # Same trick as the padded reference: a row with no visible key attends everywhere (no NaN)
        # and is then zeroed.
        mask = visible | ~seen[:, None]
        out = F.scaled_dot_product_attention(
            q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=gqa,
        ).transpose(0, 1)
        pieces.append(out * seen[:, None, None])
    if not pieces:
        return q * 0
    return torch.cat(pieces)
