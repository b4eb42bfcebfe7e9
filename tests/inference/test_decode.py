"""Cached decoding equals one full causal-mode forward (issue #8's correctness bar: 1e-5 in fp32)."""

import pytest
import torch

from mor_dist.inference.decode import forward_chunk, generate
from mor_dist.inference.kv_cache import ModelKVCache
from tests.inference.helpers import MODELS, prompt, tiny_model


def decode_in_pieces(model, seq: torch.Tensor, prefill: int):
    """Logits and depths of seq (1, T): a prefill chunk, then one token at a time."""
    cache = ModelKVCache(model, 1)
    rows = torch.zeros(1, dtype=torch.long)
    bounds = [0] + list(range(max(prefill, 1), seq.shape[1] + 1))
    logits, depths = [], []
    for a, b in zip(bounds, bounds[1:]):
        lg, d = forward_chunk(model, cache, rows, seq[:, a:b], torch.arange(a, b)[None])
        logits.append(lg)
        depths.append(d)
    return torch.cat(logits, 1), torch.cat(depths, 1), cache


@pytest.mark.parametrize("prefill", [1, 12])
@pytest.mark.parametrize("key", list(MODELS))
def test_cached_decoding_equals_full_causal_forward(key, prefill):
    model = tiny_model(key)
    seq = torch.tensor([prompt(40, seed=3)])
    with torch.no_grad():
        full = model(seq, mode="causal")
    got, depth, cache = decode_in_pieces(model, seq, prefill)
    torch.testing.assert_close(got, full.logits, rtol=0, atol=1e-5)
    assert torch.equal(depth, full.depth)
    if key.startswith("mor"):
        assert len(full.depth.unique()) >= 3, "routing too uniform to test anything"
    # Every token wrote each unique layer once.
    assert cache.entries()["unique"] == 40 * (model.layout.prefix + model.layout.suffix)


@pytest.mark.parametrize("key", ["mor_expert", "mor_token_share"])
def test_batched_rows_equal_single_rows(key):
    """Two sequences of different lengths in one cache, decoded together, match each decoded alone."""
    model = tiny_model(key)
    seqs = [prompt(n, seed=n) for n in (7, 19)]
    cache = ModelKVCache(model, 2)
    for row, s in enumerate(seqs):  # prefill each prompt into its own row
        forward_chunk(model, cache, torch.tensor([row]), torch.tensor([s]), torch.arange(len(s))[None])
    nxt = [prompt(6, seed=40 + i) for i in range(2)]
    together = []
    for step in range(6):
        pos = torch.tensor([[len(s) + step] for s in seqs])
        lg, _ = forward_chunk(model, cache, torch.tensor([0, 1]), torch.tensor([[n[step]] for n in nxt]), pos)
        together.append(lg[:, 0])
    together = torch.stack(together, 1)
    for row, s in enumerate(seqs):
        with torch.no_grad():
            full = model(torch.tensor([s + nxt[row]]), mode="causal").logits[0, len(s):]
        torch.testing.assert_close(together[row], full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", ["vanilla", "mor_expert", "mor_token"])
def test_generate_greedy_matches_full_forward_argmax(key):
    model = tiny_model(key)
    p = prompt(9, seed=5)
    out = generate(model, p, 10, keep_logits=True)
    seq = torch.tensor([p + out["tokens"][:-1]])
    with torch.no_grad():
        full = model(seq, mode="causal")
    torch.testing.assert_close(out["logits"], full.logits[0, len(p) - 1:], rtol=0, atol=1e-5)
    assert out["tokens"] == full.logits[0, len(p) - 1:].argmax(-1).tolist()
    assert out["depths"] == full.depth[0].tolist()


def test_generate_rejects_too_long():
    model = tiny_model("vanilla")
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompt(250, seed=1), 10)
