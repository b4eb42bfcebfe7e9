"""Tiny models for the inference tests: random weights, routers nudged so that several depths occur."""

import torch

from mor_dist.config import load_config
from mor_dist.model import build_model

VOCAB = 4096

MODELS = {
    "vanilla": ("vanilla", []),
    "recursive": ("recursive", []),
    "recursive_share": ("recursive", ["kv.strategy=share"]),
    "mor_expert": ("mor", []),
    "mor_expert_share": ("mor_kvshare", []),
    "mor_expert_aux": ("mor", ["routing.causal_method=aux_router"]),
    "mor_expert_mlp": ("mor", ["routing.router=mlp"]),
    "mor_token": ("mor_token", []),
    "mor_token_share": ("mor_token", ["kv.strategy=share", "routing.token_func=sigmoid"]),
}


def tiny_model(key: str, seed: int = 0):
    name, overrides = MODELS[key]
    torch.manual_seed(seed)
    model = build_model(load_config(f"configs/tiny/{name}.yaml", list(overrides))).eval()
    with torch.no_grad():
        # Random expert routers stop about half the tokens at every step; nudge them so depths 0..Nr
        # all occur in a few dozen tokens (as tests/model/test_mor.py does).
        for router in model.routers:
            for p in router.parameters():
                p.add_(0.01)
    return model


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
