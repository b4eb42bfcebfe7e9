"""Tiny models in export folders with the Hugging Face files: random weights, routers nudged so that
several recursion depths occur (as tests/inference does)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mor_dist.config import load_config, to_yaml
from mor_dist.hf.export import write_hf_files
from mor_dist.model import build_model

VOCAB = 4096

# key -> (configs/tiny preset, overrides): every router, KV strategy and sharing the modeling file covers.
MODELS = {
    "vanilla": ("vanilla", []),
    "recursive": ("recursive", []),
    "recursive_share": ("recursive", ["kv.strategy=share"]),
    "recursive_sequence_untied": ("recursive", ["model.sharing=middle_sequence", "model.tie_embeddings=false"]),
    "expert": ("mor", []),
    "expert_share": ("mor_kvshare", []),
    "expert_aux_router": ("mor", ["routing.causal_method=aux_router"]),
    "expert_mlp_cycle": ("mor", ["routing.router=mlp", "model.sharing=cycle", "model.n_layers=6"]),
    "token": ("mor_token", []),
    "token_share_sigmoid": ("mor_token", ["kv.strategy=share", "routing.token_func=sigmoid"]),
    "token_loss_free": ("mor_token", ["routing.balancing=loss_free"]),
}


def tiny_model(key: str, seed: int = 0):
    name, overrides = MODELS[key]
    torch.manual_seed(seed)
    cfg = load_config(f"configs/tiny/{name}.yaml", list(overrides))
    model = build_model(cfg).eval()
    with torch.no_grad():
        for router in model.routers:
            for p in router.parameters():
                p.add_(0.01)
        if model.token_router is not None and cfg.routing.balancing == "loss_free":
            model.token_router.bias.copy_(torch.tensor([0.0, 0.002, -0.001]))  # moves ~1/3 of the choices
    return model, cfg


def export_folder(folder: Path, key: str, tokenizer: Path | None = None):
    """An export folder as `mor export --hf` writes it, of tiny_model(key); returns (model, cfg)."""
    model, cfg = tiny_model(key)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(to_yaml(cfg))
    if tokenizer is not None:
        (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    write_hf_files(folder, cfg)
    return model, cfg


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
