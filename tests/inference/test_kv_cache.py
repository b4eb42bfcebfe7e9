"""KV-cache accounting: what each cache stores per token."""

import torch

from mor_dist.inference.decode import forward_chunk
from mor_dist.inference.kv_cache import KVStore, ModelKVCache
from tests.inference.helpers import prompt, tiny_model


def fill(model, kv, n=48):
    cache = ModelKVCache(model, 1, kv)
    with torch.no_grad():
        _, depth = forward_chunk(model, cache, torch.zeros(1, dtype=torch.long), torch.tensor([prompt(n, 4)]),
                                 torch.arange(n)[None])
    return cache, depth


def test_entries_follow_depths():
    model = tiny_model("mor_expert")
    B = model.layout.block
    rw, depth = fill(model, "recursion_wise")
    share, _ = fill(model, "share")
    # Recursion-wise: a token writes B entries per depth it reached; sharing: B entries if it reached
    # recursion 1, none otherwise.
    assert rw.entries()["shared"] == B * int(depth.sum())
    assert share.entries()["shared"] == B * int((depth >= 1).sum())


def test_recursion_wise_and_share_store_less_than_vanilla():
    n = 48
    vanilla, _ = fill(tiny_model("vanilla"), "recursion_wise", n)
    mor = tiny_model("mor_expert")
    rw, _ = fill(mor, "recursion_wise", n)
    share, _ = fill(mor, "share", n)
    rec, _ = fill(tiny_model("recursive"), "recursion_wise", n)
    # Same effective depth (8 layer applications), same head shapes: vanilla = recursive, full.
    assert vanilla.bytes_per_token() == rec.bytes_per_token() == 8 * vanilla.prefix[0].entry_bytes()
    assert share.bytes_per_token() < rw.bytes_per_token() < vanilla.bytes_per_token()


def test_store_append_keeps_rows_apart():
    s = KVStore(3, 1, 2, torch.float32, "cpu", capacity=2)
    k = torch.arange(12.0).view(2, 1, 3, 2)
    keep = torch.tensor([[True, False, True], [True, True, True]])
    s.append(torch.tensor([2, 0]), k, k, torch.tensor([[0, 1, 2], [5, 6, 7]]), keep)
    assert s.length.tolist() == [3, 0, 2] and s.capacity >= 3
    assert s.pos[2, :2].tolist() == [0, 2] and s.pos[0, :3].tolist() == [5, 6, 7]
    assert torch.equal(s.k[2, 0, 1], k[0, 0, 2])
    s.clear(torch.tensor([2]))
    assert s.entries() == 3
