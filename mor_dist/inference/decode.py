"""Incremental forward with KV caches: prefill a chunk, decode one token at a time.

forward_chunk runs new tokens (n sequences x t tokens, at given original positions) through the model
with the causal routing decisions of MoRModel's causal mode (MOR.md 3, 4, 6), reading and writing the
caches of the sequences' rows. Calling it token by token, or on a prompt then token by token, gives
the logits of one full causal-mode forward over the sequence (tests/inference/test_decode.py).

The recursion logic repeats the model's causal branch (mor.py _expert_step / _assign_depths /
_token_step) on cached frames; the equality test above is what keeps the two in step.
"""

from __future__ import annotations

import torch

from mor_dist.model.layers import TokenFrame
from mor_dist.model.routers import compact

from .kv_cache import ModelKVCache


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _scatter(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return x.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), src)


def embed_prefix(model, cache: ModelKVCache, rows, tokens, pos) -> torch.Tensor:
    """Embedding and unique first layers; every new token is counted as cached in its row."""
    h = model.embed(tokens)
    views = cache.prefix_views(rows)
    for i, layer in enumerate(model.prefix):
        h = layer(h, TokenFrame(pos, cache=views), i)
    cache.tokens[rows] += tokens.shape[1]
    return h


def suffix_logits(model, cache: ModelKVCache, rows, h, pos) -> torch.Tensor:
    views = cache.suffix_views(rows)
    for i, layer in enumerate(model.suffix):
        h = layer(h, TokenFrame(pos, cache=views), i)
    return model.output_logits(model.norm(h))


def token_choice_depths(model, h: torch.Tensor):
    """Token-choice: (assigned depth 1..Nr, gate) from the first unique layer's output (argmax)."""
    router = model.token_router
    _, probs = router.probs(h)
    scores = probs + router.bias if model.routing.balancing == "loss_free" else probs
    choice = scores.argmax(dim=-1)
    return choice + 1, probs.gather(-1, choice.unsqueeze(-1))


def expert_gate(model, x, out, logits):
    """Expert-choice update of the selected tokens: x + alpha * sigmoid(logit) * f(x)."""
    if model.routing.gating == "weighted":
        return x + (model.alpha * torch.sigmoid(logits)).unsqueeze(-1).to(x.dtype) * out
    return out


def recurse(model, cache: ModelKVCache, rows, h, pos):
    """The Nr recursion steps over a chunk; returns (h, depth (n, t))."""
    n, t, _ = h.shape
    nr = model.layout.recursions
    depth = torch.zeros(n, t, dtype=torch.long, device=h.device)
    if nr == 0:
        return h, depth
    if model.token_router is not None:
        assigned, gate = token_choice_depths(model, h)
        run = h
        for r in range(nr):
            active = assigned > r
            order, valid = compact(active)
            if order.shape[1]:
                x = _gather(run, order)
                frame = TokenFrame(pos.gather(1, order), valid, cache=cache.shared_views(rows, r))
                out = model._run_block(r, x, frame)
                if valid is not None:
                    out = torch.where(valid.unsqueeze(-1), out, x)
                run = _scatter(run, order, out)
                depth = depth + active.long()
        return h + gate.to(h.dtype) * run, depth
    if not model.routers:  # recursive: every token, every step
        for r in range(nr):
            h = model._run_block(r, h, TokenFrame(pos, cache=cache.shared_views(rows, r)))
        return h, depth + nr
    cand = torch.arange(t, device=h.device).expand(n, t)
    cand_valid = None
    for r in range(nr):
        if cand.shape[1] == 0:
            break
        router = model.routers[r]
        h_c = _gather(h, cand)
        logits = router(h_c)
        keep = router.causal_logits(h_c, logits) > 0  # sigmoid > 0.5
        if cand_valid is not None:
            keep = keep & cand_valid
        sel, valid = compact(keep)
        cand, cand_valid = cand.gather(1, sel), valid
        if cand.shape[1] == 0:
            break
        x = _gather(h, cand)
        out = model._run_block(r, x, TokenFrame(pos.gather(1, cand), valid, cache=cache.shared_views(rows, r)))
        new = expert_gate(model, x, out, logits.gather(1, sel))
        if valid is not None:
            new = torch.where(valid.unsqueeze(-1), new, x)
        h = _scatter(h, cand, new)
        depth = depth.scatter_add(1, cand, torch.ones_like(cand) if valid is None else valid.long())
    return h, depth


@torch.no_grad()
def forward_chunk(model, cache: ModelKVCache, rows, tokens, pos):
    """Logits (n, t, V) and recursion depths (n, t) of new tokens (n, t) at positions pos (n, t),
    appended to the sequences held in cache rows `rows` (n,)."""
    h = embed_prefix(model, cache, rows, tokens, pos)
    h, depth = recurse(model, cache, rows, h, pos)
    return suffix_logits(model, cache, rows, h, pos), depth


def pick(logits: torch.Tensor, temperature: float = 0.0, generator=None) -> torch.Tensor:
    """Next token from last-position logits (n, V): greedy at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, eos: int | None = None,
             kv: str | None = None, seed: int = 0, keep_logits: bool = False) -> dict:
    """Decode one request alone: prefill the prompt, then one token at a time.

    Returns {"tokens": new token ids, "depths": recursion depth of each fed token (prompt and
    generated), "logits": (steps, V) next-token logits when keep_logits, "kv_bytes_per_token"}.
    """
    if not prompt:
        raise ValueError("empty prompt")
    device = model.embed.weight.device
    limit = model.cfg.max_seq_len
    if len(prompt) + max_new_tokens - 1 > limit:
        raise ValueError(f"prompt of {len(prompt)} + {max_new_tokens} new tokens exceeds max_seq_len={limit}")
    cache = ModelKVCache(model, 1, kv)
    rows = torch.zeros(1, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([prompt], device=device)
    pos = torch.arange(len(prompt), device=device)[None]
    out, depths, kept = [], [], []
    for _ in range(max_new_tokens):
        logits, depth = forward_chunk(model, cache, rows, x, pos)
        depths.extend(depth[0].tolist())
        last = logits[:, -1]
        if keep_logits:
            kept.append(last[0])
        nxt = pick(last, temperature, gen)
        out.append(int(nxt))
        if eos is not None and out[-1] == eos:
            break
        x, pos = nxt[:, None], pos[:, -1:] + 1
    result = {"tokens": out, "depths": depths, "kv_bytes_per_token": cache.bytes_per_token()}
    if keep_logits:
        result["logits"] = torch.stack(kept)
    return result
