"""Decoding one request: the serving engine with a single row.

generate() prefills the prompt (but its last token) in chunks, then decodes token by token with the
same tick as continuous batching, so a request decoded alone and one decoded among many take the
same code path (engine.py).
"""

from __future__ import annotations

import torch

from .engine import ServingEngine


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, eos: int | None = None,
             kv: str | None = None, seed: int = 0, keep_logits: bool = False, prefill_tokens: int = 256,
             page_size: int = 16) -> dict:
    """Decode one request alone.

    Returns {"tokens": new token ids, "depths": recursion depth of each fed token (prompt and
    generated), "logits": (steps, V) next-token logits when keep_logits, "kv_entries" and
    "kv_bytes_per_token" of the caches at the end, "kv_page_bytes_per_token" (whole pages)}.
    """
    if not prompt:
        raise ValueError("empty prompt")
    engine = ServingEngine(model, 1, kv=kv, temperature=temperature, seed=seed, keep_logits=keep_logits,
                           prefill_tokens=prefill_tokens, page_size=page_size)
    engine.submit(prompt, max_new_tokens, eos)
    held = {}

    def last_tick(req):  # the cache just before the request finishes and releases its pages
        held["bytes"], held["entries"] = engine.cache.nbytes(), engine.cache.entries()

    engine.on_finish = last_tick
    req = engine.run()[0]
    cached = max(len(req.prompt) + len(req.tokens) - 1, 1)
    entries = held["entries"]["unique"] + held["entries"]["shared"]
    result = {"tokens": req.tokens, "depths": req.depths, "kv_entries": held["entries"],
              # What the caches store per token; the pages held (rounded up to pages) as well.
              "kv_bytes_per_token": entries * engine.cache.entry_bytes() / cached,
              "kv_page_bytes_per_token": held["bytes"] / cached}
    if keep_logits:
        result["logits"] = torch.stack(req.logits)
    return result
