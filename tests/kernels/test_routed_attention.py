"""Dispatch, and the padded entry point on the Triton path against the padded reference, in the
layouts the model produces: expert-choice gathers (no padding), token-choice / causal-mode gathers
(padding slots), recursion-wise and KV-sharing."""

import pytest
import torch

from mor_dist.kernels import (
    routed_attention,
    routed_attention_reference,
    routed_attention_varlen,
    routed_attention_varlen_reference,
)

B, HQ, HKV, T, D = 2, 4, 2, 40, 16


def heads(n_heads, n_tokens, device, seed, token_major=False):
    g = torch.Generator().manual_seed(seed)
    if token_major:  # the model's V: a (B, T, H, D) projection viewed as (B, H, T, D)
        return torch.randn(B, n_tokens, n_heads, D, generator=g).to(device).transpose(1, 2)
    return torch.randn(B, n_heads, n_tokens, D, generator=g).to(device)


def sorted_subsets(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:n].sort().values for _ in range(B)])


def run_padded(fn, q, k, v, q_pos, k_pos, k_valid, same_tokens, rows, **kwargs):
    """Output and grads, with the loss on the valid query slots `rows` only (padding output is
    unspecified)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, q_pos, k_pos, k_valid, same_tokens, **kwargs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device)
    weight = weight * rows.to(out.device)[:, None, :, None]
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v), allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), grads)]


def check_padded(device, q, k, v, q_pos, k_pos, k_valid=None, same_tokens=False, q_valid=None, rows=None):
    """Triton vs reference on the query slots `rows` (default: the valid ones)."""
    if rows is None:
        rows = q_valid if q_valid is not None else (k_valid if same_tokens else None)
    rows = torch.ones(B, q.shape[2], dtype=torch.bool) if rows is None else rows.cpu()
    out, grads = run_padded(
        routed_attention, q, k, v, q_pos, k_pos, k_valid, same_tokens, rows, q_valid=q_valid, backend="triton"
    )
    cpu = [None if x is None else x.cpu() for x in (q, k, v, q_pos, k_pos, k_valid)]
    ref, ref_grads = run_padded(routed_attention_reference, *cpu, same_tokens, rows)
    out = out.cpu()
    torch.testing.assert_close(out.transpose(1, 2)[rows], ref.transpose(1, 2)[rows], atol=2e-5, rtol=2e-5)
    if q_valid is not None or same_tokens:  # the Triton path leaves padding slots it knows of at 0
        assert out.transpose(1, 2)[~rows].abs().sum() == 0
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_expert_choice_recursion(device):
    # Same k_r active tokens in every sequence: read in place, no reordering.
    pos = sorted_subsets(23, seed=0).to(device)
    q, k = heads(HQ, 23, device, 1), heads(HKV, 23, device, 2)
    v = heads(HKV, 23, device, 3, token_major=True)
    check_padded(device, q, k, v, pos, pos, same_tokens=True)


def test_token_choice_recursion_with_padding(device):
    # Variable active counts, padding slots anywhere in the row, and slots not in position order
    # (masked rows are reordered, so any order is accepted).
    g = torch.Generator().manual_seed(5)
    shuffle = torch.stack([torch.randperm(23, generator=g) for _ in range(B)])
    pos = sorted_subsets(23, seed=4).gather(1, shuffle).to(device)
    valid = torch.rand(B, 23, generator=g) < 0.6
    valid[1] = False  # a sequence with no active token
    valid = valid.to(device)
    q, k, v = heads(HQ, 23, device, 6), heads(HKV, 23, device, 7), heads(HKV, 23, device, 8)
    check_padded(device, q, k, v, pos, pos, valid, same_tokens=True)


@pytest.mark.parametrize("pass_q_valid", [True, False])
def test_kv_sharing_padded_queries(device, pass_q_valid):
    # Queries laid out as the model's compact(): active tokens first, then padding slots pointing at
    # dropped tokens, whose positions restart low (the rows are not ascending overall). Without q_valid
    # the padding slots are attended as real queries, in place.
    g = torch.Generator().manual_seed(10)
    keep = torch.rand(B, T, generator=g) < 0.4
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :24]
    q_valid, q_pos = keep.gather(1, order).to(device), order.to(device)
    k_pos = torch.arange(T).expand(B, T).to(device)
    q, k, v = heads(HQ, 24, device, 11), heads(HKV, T, device, 12), heads(HKV, T, device, 13)
    if pass_q_valid:
        check_padded(device, q, k, v, q_pos, k_pos, q_valid=q_valid)
    else:
        check_padded(device, q, k, v, q_pos, k_pos, rows=q_valid)


def test_kv_sharing_expert_choice(device):
    q_pos = sorted_subsets(13, seed=14).to(device)
    k_pos = torch.arange(T).expand(B, T).to(device)
    q, k, v = heads(HQ, 13, device, 15), heads(HKV, T, device, 16), heads(HKV, T, device, 17)
    check_padded(device, q, k, v, q_pos, k_pos)


def test_auto_backend_on_cpu_is_the_reference():
    pos = sorted_subsets(9, seed=18)
    q, k, v = heads(HQ, 9, "cpu", 19), heads(HKV, 9, "cpu", 20), heads(HKV, 9, "cpu", 21)
    valid = torch.rand(B, 9, generator=torch.Generator().manual_seed(22)) < 0.5
    assert torch.equal(
        routed_attention(q, k, v, pos, pos, valid, same_tokens=True),
        routed_attention_reference(q, k, v, pos, pos, valid, same_tokens=True),
    )
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    packed = [x.transpose(1, 2).reshape(-1, x.shape[1], D) for x in (q, k, v)]
    assert torch.equal(
        routed_attention_varlen(*packed, cu, cu, pos.reshape(-1), pos.reshape(-1)),
        routed_attention_varlen_reference(*packed, cu, cu, pos.reshape(-1), pos.reshape(-1)),
    )


def test_backend_argument_is_checked(monkeypatch):
    q = torch.randn(1, 2, 4, D)
    pos = torch.arange(4)[None]
    with pytest.raises(ValueError, match="backend"):
        routed_attention(q, q, q, pos, pos, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        routed_attention(q, q, q, pos, pos, backend="triton")


def test_unsupported_head_dim_is_refused(device):
    q = torch.randn(1, 2, 4, 24, device=device)
    pos = torch.arange(4, device=device)[None]
    with pytest.raises(ValueError, match="head dims"):
        routed_attention(q, q, q, pos, pos, backend="triton")
