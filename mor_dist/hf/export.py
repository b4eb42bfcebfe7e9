"""`mor export RUN -o OUT --hf`: the export folder, made loadable by Hugging Face transformers
(training/export.py calls write_hf_files once the usual files are written).

Beside what `mor export` writes (model.safetensors, config.yaml, tokenizer.json), it writes
config.json (model_type "mor", auto_map to the two files below), generation_config.json,
modeling_mor.py + configuration_mor.py (copied from this package: they need torch and transformers
only), and tokenizer_config.json + special_tokens_map.json for AutoTokenizer. The weights are not
renamed: the modeling file uses mor's parameter names, so `mor generate OUT` still works on the folder.
Writing needs no transformers; loading does (`pip install "mor_dist[hf]"`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mor_dist.checkpoint import CheckpointError
from mor_dist.run_folder.files import replacing

TEMPLATES = ("configuration_mor.py", "modeling_mor.py")
HF_FILES = ("config.json", *TEMPLATES)


def hf_config(cfg, eos_id: int | None = None, pad_id: int | None = None) -> dict:
    """config.json of the model a mor config describes."""
    m, rt = cfg.model, cfg.routing
    alpha = rt.alpha
    if alpha is None:  # the routers' defaults (model/mor.py)
        alpha = 1.0 if rt.type == "token" and rt.token_func == "softmax" else 0.1
    return {
        "architectures": ["MoRForCausalLM"],
        "model_type": "mor",
        "auto_map": {
            "AutoConfig": "configuration_mor.MoRConfig",
            "AutoModelForCausalLM": "modeling_mor.MoRForCausalLM",
        },
        "dtype": "float32",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim or m.d_model // m.n_heads,
        "max_position_embeddings": m.max_seq_len,
        "rope_theta": m.rope_theta,
        "rms_norm_eps": m.norm_eps,
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "recursions": m.recursions,
        "sharing": m.sharing,
        "pad_layers": m.pad_layers,
        "routing_type": rt.type,
        "router": rt.router,
        "router_alpha": alpha,
        "causal_method": rt.causal_method,
        "gating": rt.gating,
        "token_func": rt.token_func,
        "balancing": rt.balancing,
        "kv_strategy": cfg.kv.strategy,
    }


def _special_id(tokenizer_json: dict, token: str) -> int | None:
    for t in tokenizer_json.get("added_tokens", []):
        if t.get("content") == token:
            return t["id"]
    return tokenizer_json.get("model", {}).get("vocab", {}).get(token)


def write_hf_files(out_dir: str | Path, cfg) -> Path:
    """Add the Hugging Face files to an export folder holding model.safetensors (and, when the run
    had one, tokenizer.json). Returns config.json's path."""
    out = Path(out_dir)
    if not (out / "model.safetensors").is_file():
        raise CheckpointError(f"{out / 'model.safetensors'}: missing; export the run first (mor export RUN -o {out})")
    eos = pad = None
    tok_path = out / "tokenizer.json"
    if tok_path.is_file():
        try:
            tok = json.loads(tok_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{tok_path}: not a tokenizers JSON file ({e}); export the run again") from None
        eos, pad = _special_id(tok, cfg.data.eos_token), _special_id(tok, cfg.data.pad_token)
        special = {k: v for k, v in (("eos_token", cfg.data.eos_token), ("pad_token", cfg.data.pad_token))
                   if _special_id(tok, v) is not None}
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "bos_token": None,
            "unk_token": None,
            "add_bos_token": False,  # the model was trained on documents separated by EOS, no BOS
            "add_eos_token": False,
            "model_max_length": cfg.model.max_seq_len,
            "clean_up_tokenization_spaces": False,  # byte-level BPE: decode(encode(text)) == text
        }
        _write_json(out / "tokenizer_config.json", tok_cfg)
        _write_json(out / "special_tokens_map.json", special)
    _write_json(out / "config.json", hf_config(cfg, eos, pad))
    gen = {"do_sample": False, "eos_token_id": eos, "pad_token_id": pad if pad is not None else eos}
    _write_json(out / "generation_config.json", gen)
    here = Path(__file__).parent
    for name in TEMPLATES:
        with replacing(out / name) as tmp:
            shutil.copyfile(here / name, tmp)
    return out / "config.json"


def _write_json(path: Path, obj) -> None:
    with replacing(path) as tmp:  # a link planted at `path` is replaced, not written through
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
