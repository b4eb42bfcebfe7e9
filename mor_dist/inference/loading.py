"""A model and its tokenizer from an export folder (`mor export`) or a run folder (its checkpoint)."""

from __future__ import annotations

from pathlib import Path

from mor_dist.checkpoint import CheckpointError


def load_for_inference(path: str | Path, step: int | None = None):
    """(model in eval mode, tokenizers.Tokenizer or None) of an export folder or a run folder."""
    from mor_dist.config import load_config
    from mor_dist.model import build_model
    from mor_dist.training.export import consolidated_state, find_tokenizer, load_exported

    path = Path(path)
    if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        model, cfg = load_exported(path), load_config(path / "config.yaml")
        tok_path = path / "tokenizer.json"
    elif (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        cfg = load_config(path / "config.yaml")
        state, meta, folder = consolidated_state(path, step)
        model = build_model(cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{folder} does not match {path / 'config.yaml'}: missing {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]}")
        model.eval()
        # The dataset's tokenizer, found as the run found it (a relative data path is relative to the
        # folder `mor train` ran in, not to this one).
        tok_path, _ = find_tokenizer(cfg, path, meta)  # not found: token ids only
    else:
        raise CheckpointError(f"{path} is neither an export folder (model.safetensors + config.yaml) nor a run "
                              "folder (config.yaml + checkpoints/)")
    tokenizer = None
    if tok_path is not None and tok_path.is_file():
        from mor_dist.data_pipeline.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_path)
    return model, tokenizer
