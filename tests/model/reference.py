"""An independent, deliberately naive MoR forward for tests: every recursion runs the shared block
over the FULL sequence with explicit masks (which tokens are keys, who is updated), instead of the
model's gather -> compact block -> scatter path. Attention is written out by hand."""

from __future__ import annotations

import math

import torch

from mor_dist.model.routers import capacity_at


def dense_layer(layer, h, pos, key_mask, kv=None):
    """One transformer layer over all T tokens; attention restricted to keys in key_mask (B, T) at or
    before each query's position. kv: (k, v, key_mask) to use instead of computing them."""
    a = layer.attn
    x = layer.attn_norm(h)
    q = a.rope(a._heads(a.wq(x)), pos)
    if kv is None:
        k, v = a.rope(a._heads(a.wk(x)), pos), a._heads(a.wv(x))
        new_kv = (k, v, key_mask)
    else:
        k, v, key_mask = kv
        new_kv = kv
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = key_mask[:, None, None, :] & (pos[:, None, None, :] <= pos[:, None, :, None])
    scores = scores.masked_fill(~allowed, float("-inf"))
    att = torch.nan_to_num(scores.softmax(-1))  # rows with no key belong to untouched tokens
    o = (att @ v).transpose(1, 2).flatten(2)
    h2 = h + a.wo(o)
    return h2 + layer.mlp(layer.mlp_norm(h2)), new_kv


def dense_block(model, r, h, pos, key_mask, kv_store):
    share = model.kv_strategy == "share"
    for j, li in enumerate(model.layout.schedule[r]):
        kv = kv_store.get(j) if share and r > 0 else None
        h, new_kv = dense_layer(model.shared[li], h, pos, key_mask, kv)
        if share and r == 0:
            kv_store[j] = new_kv
    return h


def reference_forward(model, tokens, mode):
    """Logits of `model` computed the naive way."""
    state = model.begin(tokens, mode)  # embedding + unique first layers (not under test here)
    h, pos = state.h, state.pos
    b, t, _ = h.shape
    kv_store = {}
    if model.token_router is not None:
        h1, run = h, h
        for r in range(model.layout.recursions):
            active = state.assigned > r
            f = dense_block(model, r, run, pos, active, kv_store)
            run = torch.where(active.unsqueeze(-1), f, run)
        h = h1 + state.gate * run
    elif model.routers:
        sel = torch.ones(b, t, dtype=torch.bool)
        for r, router in enumerate(model.routers):
            logits = router.net(h).squeeze(-1)
            if mode == "topk":
                c = capacity_at(model.capacity[r], int(model.train_step), model.routing.capacity_warmup_steps)
                k = max(1, int(c * t))
                top = logits.masked_fill(~sel, float("-inf")).topk(k, dim=1).indices
                new_sel = torch.zeros_like(sel).scatter(1, top, True)
            else:
                causal = logits if router.aux_net is None else router.aux_net(h).squeeze(-1)
                new_sel = sel & (causal > 0)
            f = dense_block(model, r, h, pos, new_sel, kv_store)
            if model.routing.gating == "weighted":
                g = model.alpha * torch.sigmoid(logits).unsqueeze(-1)
                f = h + g * f
            h = torch.where(new_sel.unsqueeze(-1), f, h)
            sel = new_sel
    else:
        for r in range(model.layout.recursions):
            h = dense_block(model, r, h, pos, torch.ones(b, t, dtype=torch.bool), kv_store)
    state.h = h
    return model.finish(state).logits
