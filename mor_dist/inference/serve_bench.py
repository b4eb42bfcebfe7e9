"""Serving measurement: synthetic requests through the depth-wise batcher, tokens/s and KV bytes."""

from __future__ import annotations

import torch

from .batcher import DepthWiseBatcher


def synthetic_prompts(n: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n random prompts, lengths uniform in [prompt_len // 2, prompt_len]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (m,), generator=g).tolist() for m in lens]


@torch.no_grad()
def serve(model, prompts: list[list[int]], gen_len: int, slots: int, max_requests: int, kv: str | None = None) -> dict:
    """Serve every prompt for gen_len new tokens (no EOS); throughput and cache figures."""
    batcher = DepthWiseBatcher(model, slots=slots, max_requests=max_requests, kv=kv)
    for p in prompts:
        batcher.submit(p, gen_len)
    done = batcher.run()
    st = batcher.stats
    new_depths = [d for r in done.values() for d in r.depths[len(r.prompt):]]
    nr = model.layout.recursions
    hist = [new_depths.count(i) / max(len(new_depths), 1) for i in range(nr + 1)]
    lay = model.layout
    per_layer = batcher.cache.prefix[0].entry_bytes() if batcher.cache.prefix else batcher.cache.shared[0].entry_bytes()
    return {
        "requests": len(prompts),
        "generated": st["generated"],
        "seconds": st["seconds"],
        "tokens_per_s": st["generated"] / st["seconds"],
        "ticks": st["ticks"],
        # Mean occupancy of the shared block's slots over the ticks that ran it.
        "slot_fill": st["slot_steps"] / max(st["ticks"], 1) / max(slots, 1) if nr else None,
        "peak_kv_bytes": st["peak_kv_bytes"],
        "kv_bytes_per_token": kv_bytes_per_token(model, batcher.cache.kv, new_depths),
        "vanilla_same_depth_kv_bytes_per_token": lay.effective_depth * per_layer,
        "depth_hist": hist,
    }


def kv_bytes_per_token(model, kv: str, depths: list[int]) -> float:
    """Cache bytes a token holds on average given the depths tokens reached (1 entry = K and V of one
    token at one layer call site): unique layers always, shared layers per depth reached
    (recursion-wise) or once if it reached recursion 1 (sharing)."""
    lay = model.layout
    attn = (list(model.prefix) + list(model.shared) + list(model.suffix))[0].attn
    entry = 2 * attn.wk.out_features * attn.wk.weight.element_size()
    if not depths:
        return float(lay.prefix + lay.suffix) * entry
    if kv == "recursion_wise":
        shared = lay.block * sum(depths) / len(depths)
    else:
        shared = lay.block * sum(d >= 1 for d in depths) / len(depths)
    return (lay.prefix + lay.suffix + shared) * entry
