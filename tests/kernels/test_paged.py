"""The Triton paged-attention kernel (pages read in place) against the torch path (pages gathered)."""

import pytest
import torch

from mor_dist.kernels import paged_attention


def paged_case(n=3, hq=4, hkv=2, d=16, page=16, pages=12, t=1, lengths=(0, 5, 37), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_pool = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    v_pool = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    width = max(1, -(-max(lengths) // page))
    # Each row's pages: distinct ids from the pool, in a scrambled order (pages need not be adjacent).
    ids = torch.randperm(pages - 1, generator=g)[: n * width].view(n, width) + 1
    pos_pool = torch.zeros(pages, page, dtype=torch.long)
    for r, length in enumerate(lengths):
        # Positions ascend with gaps (a recursion-wise row holds only the tokens that reached it).
        pos = torch.cumsum(torch.randint(1, 3, (width * page,), generator=g), 0)
        pos_pool[ids[r]] = pos.view(width, page)
    q = torch.randn(n, hq, t, d, generator=g).to(dtype)
    top = pos_pool[ids].view(n, -1)
    q_pos = torch.stack([torch.randint(0, int(top[r, max(lengths[r] - 1, 0)]) + 2, (t,), generator=g) for r in range(n)])
    return q, q_pos, k_pool, v_pool, pos_pool, ids, torch.tensor(lengths)


def seen(q_pos, pos_pool, pages, length):
    """Which queries see at least one key (the others' outputs are unspecified)."""
    n, w = pages.shape
    k_pos = pos_pool[pages].view(n, -1)
    ok = torch.arange(k_pos.shape[1])[None] < length[:, None]
    return ((k_pos[:, None, :] <= q_pos[:, :, None]) & ok[:, None, :]).any(-1)  # (n, t)


@pytest.mark.parametrize("t", [1, 5, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_paged_attention_matches_torch_path(device, t, dtype):
    args = paged_case(t=t, dtype=dtype)
    args = [a.to(device) for a in args]
    want = paged_attention(*args, backend="torch").float()
    got = paged_attention(*args, backend="triton").float()
    mask = seen(args[1], args[4], args[5], args[6]).cpu()
    assert mask.any() and not mask.all()  # some queries see keys, some see none
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    m = mask[:, None, :, None].expand_as(want.cpu())
    torch.testing.assert_close(got.cpu()[m], want.cpu()[m], rtol=0, atol=tol)
    assert torch.all(got.cpu()[~m] == 0)  # a query that sees no key gets 0


def test_triton_paged_attention_page_32_head_64(device):
    args = [a.to(device) for a in paged_case(d=64, page=32, pages=8, lengths=(31, 64, 3), t=3, hq=8, hkv=8)]
    mask = seen(args[1], args[4], args[5], args[6]).cpu()[:, None, :, None]
    want = paged_attention(*args, backend="torch")
    got = paged_attention(*args, backend="triton")
    torch.testing.assert_close(got.cpu()[mask.expand_as(got.cpu())], want.cpu()[mask.expand_as(got.cpu())],
                               rtol=0, atol=1e-5)
