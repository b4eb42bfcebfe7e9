"""Parameter counts (built on the meta device: no weights allocated) and the paper's FLOPs model.

FLOPs (MOR.md 7): forward only, 2 x non-embedding params per token for the linear layers (routers
included, the output head not), plus causal attention
(QK^T and AV over the lower triangle); at recursion r the token count follows the capacity c_r.
Training FLOPs = 3 x forward. Norms, softmax and RoPE are not counted, as in the paper.
"""

from __future__ import annotations

import torch

from mor_dist.model.layout import make_layout


def count_parameters(cfg) -> dict:
    """Parameter counts of the model the config describes, without allocating its weights."""
    from mor_dist.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)

    def n(mod) -> int:
        return sum(p.numel() for p in mod.parameters()) if mod is not None else 0

    total = n(model)
    embedding = model.embed.weight.numel() + (n(model.head) if model.head is not None else 0)
    shared = n(model.shared)
    unique_layers = n(model.prefix) + n(model.suffix)
    routers = n(model.routers) + n(model.token_router)
    lay = model.layout
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "unique_layers": unique_layers,  # the unshared first/last layers (all layers when vanilla)
        "shared_block": shared,  # one copy; applied `recursions` times
        "routers": routers,
        "final_norm": n(model.norm),
        # What a vanilla model of the same effective depth would hold (shared block unrolled).
        "unrolled_non_embedding": total - embedding + shared * (lay.recursions - 1) if lay.recursions else total - embedding,
    }


def step_token_fractions(cfg) -> list[float]:
    """Fraction of a sequence's tokens processed at each recursion step in training.

    Expert-choice: the capacity (k_r = max(1, floor(c_r T)) / T). Token-choice cannot be known before
    training; we assume balanced depths (the balancing loss's target): (Nr - r + 1) / Nr.
    Plain recursion: 1.
    """
    lay = make_layout(cfg.model.n_layers, cfg.model.recursions, cfg.model.sharing, cfg.model.pad_layers)
    nr, t, rt = lay.recursions, cfg.data.seq_len, cfg.routing
    if rt.type == "expert":
        caps = list(rt.capacity) if rt.capacity else [(nr - r) / nr for r in range(nr)]
        return [max(1, int(c * t)) / t for c in caps]
    if rt.type == "token":
        return [(nr - r) / nr for r in range(nr)]
    return [1.0] * nr


def router_flops(cfg, r: int) -> float:
    """Forward FLOPs per token of recursion r's expert router (it scores the previous step's tokens)."""
    m, rt = cfg.model, cfg.routing
    if rt.type != "expert":
        return 0.0
    fracs = step_token_fractions(cfg)
    router = m.d_model if rt.router == "linear" else (2 * m.d_model * m.d_model + 2 * m.d_model)
    return 2 * router * (fracs[r - 1] if r else 1.0)


def forward_flops_pieces(cfg) -> dict:
    """Forward FLOPs per token of each piece of the model, in its order: the unique first layers
    (with the token-choice router), each recursion step (with its expert router), the unique last
    layers, and the output head (which the paper's accounting leaves out; pipeline stages do not)."""
    m, rt = cfg.model, cfg.routing
    lay = make_layout(m.n_layers, m.recursions, m.sharing, m.pad_layers)
    t = cfg.data.seq_len
    hd = m.head_dim or m.d_model // m.n_heads
    q_o = 2 * m.d_model * m.n_heads * hd  # wq + wo parameters
    kv = 2 * m.d_model * m.n_kv_heads * hd  # wk + wv
    mlp = 3 * m.d_model * m.d_ff

    def causal_pairs(nq: float, nk: float) -> float:
        """(query, key) pairs a causal mask keeps; queries spread evenly over the keys' span."""
        return nq * (nk + 1) / 2

    def layer(nq: float, nk: float, own_kv: bool) -> float:
        lin = 2 * (q_o + mlp + (kv if own_kv else 0)) * nq
        attn = 2 * 2 * hd * m.n_heads * causal_pairs(nq, nk)  # QK^T and AV
        return lin + attn

    first = lay.prefix * layer(t, t, True)
    if rt.type == "token":
        router = m.d_model * lay.recursions if rt.router == "linear" else (2 * m.d_model**2 + 2 * m.d_model * lay.recursions)
        first += 2 * router * t
    fracs = step_token_fractions(cfg)
    share = cfg.kv.strategy == "share"
    n1 = fracs[0] * t if fracs else t
    steps = []
    for r, f in enumerate(fracs):
        n = f * t
        cost = lay.block * (layer(n, n1, own_kv=False) if share and r > 0 else layer(n, n, own_kv=True))
        steps.append(cost / t + router_flops(cfg, r))
    return {"first": first / t, "recursions": steps, "last": lay.suffix * layer(t, t, True) / t,
            "head": 2 * m.d_model * m.vocab_size}


def forward_flops_per_token(cfg) -> float:
    pieces = forward_flops_pieces(cfg)
    # The output head is left out, as in the paper's accounting (its isoFLOP budgets match the
    # non-embedding count: 360m MoR Nr=2 / vanilla = 12.3 / 16.5).
    return pieces["first"] + sum(pieces["recursions"]) + pieces["last"]


def train_flops_per_token(cfg) -> float:
    return 3.0 * forward_flops_per_token(cfg)


def run_length(cfg) -> dict:
    """Steps, tokens and training FLOPs of the run the config describes, and which key set them."""
    from mor_dist.config.budget import tokens_per_step

    t = cfg.train
    per_step = tokens_per_step(cfg)
    set_by = ("train.flops_budget" if t.flops_budget is not None
              else "train.tokens" if t.tokens is not None else "train.steps")
    return {
        "set_by": set_by,
        "steps": t.steps,
        "tokens_per_step": per_step,
        "tokens": t.steps * per_step,
        "train_flops": t.steps * per_step * train_flops_per_token(cfg),
    }


def model_info(cfg) -> dict:
    """What `mor info` prints."""
    m = cfg.model
    lay = make_layout(m.n_layers, m.recursions, m.sharing, m.pad_layers)
    fracs = step_token_fractions(cfg)
    return {
        "params": count_parameters(cfg),
        "layout": {
            "sharing": lay.sharing,
            "prefix_layers": lay.prefix,
            "layers_per_block": lay.block,
            "recursions": lay.recursions,
            "suffix_layers": lay.suffix,
            "effective_depth": lay.effective_depth,
            # Mean layer applications per token in training (capacity-weighted).
            "mean_depth": lay.prefix + lay.suffix + lay.block * sum(fracs),
            "routing": cfg.routing.type,
            "kv": cfg.kv.strategy,
        },
        "flops": {
            "seq_len": cfg.data.seq_len,
            "forward_per_token": forward_flops_per_token(cfg),
            "train_per_token": train_flops_per_token(cfg),
        },
        "run": run_length(cfg),
    }
