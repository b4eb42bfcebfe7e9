"""The torch references: checked against a written-out softmax, and against each other."""

import torch

from mor_dist.kernels import routed_attention_reference, routed_attention_varlen_reference


def naive_varlen(q, k, v, cu_q, cu_k, q_pos, k_pos):
    """Attention written out per sequence: scores, position mask, softmax over visible keys."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        kk = k[ks].repeat_interleave(group, dim=1)  # (n_k, Hq, D)
        vv = v[ks].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[qs], kk) * q.shape[-1] ** -0.5
        visible = k_pos[ks][None, :] <= q_pos[qs][:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
        out[qs] = torch.einsum("hqk,khd->qhd", probs, vv)
    return out


def test_varlen_reference_matches_written_out_softmax(varlen_case, active_positions):
    # Recursion-wise sequences (with an empty one and a single token) and a KV-sharing one where
    # query 0 (position 1) sees no key at all.
    q_pos = active_positions([6, 0, 1, 11], 16, seed=3) + [torch.tensor([1, 4, 9])]
    k_pos = q_pos[:4] + [torch.tensor([2, 3, 4, 8, 12])]
    case = varlen_case(q_pos, k_pos, hq=6, hkv=2, d=8)
    got = routed_attention_varlen_reference(case.q, case.k, case.v, case.cu_q, case.cu_k, case.q_pos, case.k_pos)
    want = naive_varlen(case.q, case.k, case.v, case.cu_q.tolist(), case.cu_k.tolist(), case.q_pos, case.k_pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[-3].abs().max() == 0  # the query with no visible key


def test_padded_reference_agrees_with_varlen_reference():
    torch.manual_seed(0)
    b, hq, hkv, t, d = 3, 4, 2, 12, 8
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    pos = torch.stack([torch.randperm(30)[:t].sort().values for _ in range(b)])
    k_valid = torch.rand(b, t) < 0.7
    # Slot 0 holds the smallest position: every query sees a valid key (else the padded reference
    # returns garbage for it, by design).
    k_valid[:, 0] = True
    padded = routed_attention_reference(q, k, v, pos, pos, k_valid)
    # The same problem packed: every query slot, only the valid key slots.
    lens_k = k_valid.sum(1)
    cu_q = torch.arange(b + 1, dtype=torch.int32) * t
    cu_k = torch.cat([torch.zeros(1, dtype=torch.long), lens_k.cumsum(0)]).to(torch.int32)
    packed = routed_attention_varlen_reference(
        q.transpose(1, 2).reshape(b * t, hq, d), k.transpose(1, 2)[k_valid], v.transpose(1, 2)[k_valid],
        cu_q, cu_k, pos.reshape(-1), pos[k_valid],
    )
    torch.testing.assert_close(packed, padded.transpose(1, 2).reshape(b * t, hq, d), atol=1e-5, rtol=1e-5)


def test_padded_reference_causal_shortcut_equals_position_mask():
    # same_tokens without padding takes SDPA's is_causal path; it must equal the position mask.
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 6, 10, 16), torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16)
    pos = torch.stack([torch.randperm(40)[:10].sort().values for _ in range(2)])
    fast = routed_attention_reference(q, k, v, pos, pos, same_tokens=True)
    masked = routed_attention_reference(q, k, v, pos, pos)
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=1e-5)
