"""Triton forward and backward (through routed_attention_varlen, backend="triton") against the varlen
torch reference: recursion-wise and KV-sharing layouts, ragged batches, grouped-query heads, dtypes.

Under the interpreter the kernels use 16x16 tiles, so sequences of ~40 tokens cross several blocks and
take the unmasked, masked and skipped paths of both the key walk (forward, dQ) and the query walk (dK/dV).
"""

import pytest
import torch

from mor_dist.kernels import routed_attention_varlen, routed_attention_varlen_reference


def positions(name, active):
    """(q positions, k positions) per sequence for a named layout."""
    if name == "ragged":  # recursion-wise: an empty sequence, one token, non-contiguous positions
        q = active([5, 0, 23, 1], 40, seed=0)
        return q, q
    if name == "all_active":  # recursion-wise at capacity 1
        q = [torch.arange(37), torch.arange(37)]
        return q, q
    if name == "kv_share":  # active queries against every recursion-1 token (keys even when q is empty)
        return active([5, 0, 23, 1], 40, seed=1), [torch.arange(40)] * 4
    if name == "single_tokens":
        q = active([1, 1, 1], 40, seed=2)
        return q, q
    if name == "no_visible_key":  # queries 0 and 5 precede every key: output 0, no gradient
        q = [torch.tensor([0, 5, 9, 20, 21]), torch.arange(3, 30)]
        return q, [torch.tensor([6, 7, 8, 30]), torch.arange(30)]
    if name == "block_edges":  # KV-sharing with positions at the 16-token tile edges (interpreter tiles):
        # query tile 0 ends at key tile 1's first position, tile 1 starts one before key tile 1's last,
        # tiles 2 and 3 start at the last position of key tiles 2 and 3 (every tile-skip boundary).
        tiles = [torch.arange(15), torch.tensor([16]), torch.arange(30, 46), torch.arange(47, 63), torch.tensor([63])]
        q = torch.cat(tiles)
        return [q], [torch.arange(64)]
    if name == "unordered_queries":  # queries out of position order, keys in order; recursion-wise, KV-sharing
        a, b = active([37, 33], 40, seed=5)
        g = torch.Generator().manual_seed(6)
        return [a[torch.randperm(37, generator=g)], b[torch.randperm(33, generator=g)]], [a, torch.arange(40)]
    raise KeyError(name)


def check(case, tolerances):
    out, grads = case.run(
        routed_attention_varlen, backend="triton", max_seqlen_q=case.max_q, max_seqlen_k=case.max_k
    )
    ref_out, ref_grads = case.run(routed_attention_varlen_reference, upcast=True)
    (fwd_atol, fwd_rtol), (grad_atol, grad_rtol) = tolerances[case.q.dtype]
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    torch.testing.assert_close(out.float(), ref_out, atol=fwd_atol, rtol=fwd_rtol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == case.q.dtype, name
        torch.testing.assert_close(got.float(), want, atol=grad_atol, rtol=grad_rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "layout",
    ["ragged", "all_active", "kv_share", "single_tokens", "no_visible_key", "block_edges", "unordered_queries"],
)
def test_fp32_matches_reference(layout, device, varlen_case, active_positions, tolerances):
    check(varlen_case(*positions(layout, active_positions), device=device), tolerances)


@pytest.mark.parametrize("hq, hkv, d", [(3, 1, 32), (2, 2, 16)])
def test_head_layouts(hq, hkv, d, device, varlen_case, active_positions, tolerances):
    case = varlen_case(*positions("ragged", active_positions), hq=hq, hkv=hkv, d=d, device=device)
    check(case, tolerances)


@pytest.mark.parametrize("d", [64, 128])  # the model's head dims
def test_model_head_dims(d, device, varlen_case, active_positions, tolerances):
    q = active_positions([9, 20], 24, seed=4)
    check(varlen_case(q, q, hq=2, hkv=1, d=d, device=device), tolerances)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["ragged", "kv_share"])
def test_half_precision(layout, dtype, device, varlen_case, active_positions, tolerances):
    check(varlen_case(*positions(layout, active_positions), d=32, dtype=dtype, device=device), tolerances)


def test_no_visible_key_rows_are_zero(device, varlen_case, active_positions):
    case = varlen_case(*positions("no_visible_key", active_positions), device=device)
    out, (dq, _, _) = case.run(routed_attention_varlen, backend="triton")
    assert out[:2].abs().max() == 0 and dq[:2].abs().max() == 0
    assert out[2:].abs().amin(dim=(1, 2)).gt(0).all()


def test_all_sequences_empty(device, varlen_case):
    empty = torch.zeros(0, dtype=torch.long)
    case = varlen_case([empty, empty], [empty, torch.arange(5)], device=device)
    out, (dq, dk, dv) = case.run(routed_attention_varlen, backend="triton")
    assert out.shape == (0, 4, 16) and dq.shape == (0, 4, 16)
    assert dk.shape == (5, 2, 16) and dk.abs().max() == 0 and dv.abs().max() == 0
