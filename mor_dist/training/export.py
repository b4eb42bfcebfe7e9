"""`mor export`: one consolidated safetensors file plus the config, for inference and evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mor_dist.checkpoint import CheckpointError, CheckpointManager
from mor_dist.checkpoint.safe_load import guarded_loads, safe_load

log = logging.getLogger("mor.export")


def consolidated_state(run_dir: Path, step: int | None = None) -> tuple[dict, dict, Path]:
    """fp32 model state of a checkpoint of any layout (tensor/pipeline shards merged by
    merge_shards.py; ZeRO-3 with tensor parallelism through the universal copy), its meta.json, and
    its folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mgr = CheckpointManager(run_dir, keep_last=1)
    folder = mgr.latest() if step is None else mgr.root / mgr.step_name(step)
    if folder is None or not folder.is_dir():
        raise CheckpointError(f"{mgr.root}: no checkpoint {'latest' if step is None else step}; "
                              f"train the run first, or pick one of {[p.name for p in mgr.step_folders()]}")
    meta = mgr.verify(folder)  # every byte against its sha256 before anything is read
    par = meta.get("config", {}).get("parallel", {})
    tp, pp = par.get("tensor", 1), par.get("pipeline", 1)
    if tp > 1 and par.get("zero_stage", 0) >= 3:
        # ZeRO-3 scatters each tensor-parallel shard over the data-parallel ranks too: the weights come
        # from the checkpoint's universal copy (made now unless cached, as a resume at another layout would).
        from mor_dist.checkpoint.universal import read_model_state
        from mor_dist.training.reshard import ensure_universal

        out = folder.parent.parent / "universal" / folder.name
        ensure_universal(folder, meta, out, "for export")
        return read_model_state(out), meta, folder
    if tp > 1 or pp > 1:
        from mor_dist.training.merge_shards import merge_parallel

        return merge_parallel(folder, tp, pp), meta, folder
    with guarded_loads():  # DeepSpeed's reader calls torch.load itself
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    # Buffers that carry routing state (warmup counters, loss-free bias) sit beside the parameters.
    module_file = folder / "mp_rank_00_model_states.pt"
    if module_file.is_file():
        saved = safe_load(module_file)
        for name in saved.get("buffer_names", []):
            if name in saved["module"]:
                state[name] = saved["module"][name].float() if saved["module"][name].is_floating_point() else saved["module"][name]
    return state, meta, folder


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None, hf: bool = False) -> Path:
    """hf: also the Hugging Face files (mor_dist/hf/export.py), for AutoModelForCausalLM."""
    from safetensors.torch import save_file

    from mor_dist.config import load_config
    from mor_dist.model import build_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_config(run_dir / "config.yaml")
    state, meta, folder = consolidated_state(run_dir, step)
    with torch.device("meta"):
        model = build_model(cfg)
    check_fits(state, model, f"{folder} does not match the model of {run_dir / 'config.yaml'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"),
              metadata={"step": str(meta["step"]), "tokens_seen": str(meta["tokens_seen"]), "source": str(folder)})
    (out_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    tok = Path(cfg.data.tokenizer or Path(cfg.data.dataset_dir) / "tokenizer.json")
    if tok.is_file():
        (out_dir / "tokenizer.json").write_bytes(tok.read_bytes())
    (out_dir / "export.json").write_text(json.dumps({"step": meta["step"], "source": str(folder)}, indent=1))
    if hf:
        from mor_dist.hf.export import write_hf_files

        write_hf_files(out_dir, cfg)
    log.info("exported step %d of %s to %s", meta["step"], run_dir, out_dir)
    return out_dir / "model.safetensors"


def check_fits(state: dict, model, what: str) -> None:
    """Raise CheckpointError(what: ...) unless state has exactly the model's names and shapes."""
    expected = model.state_dict()
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    shapes = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or extra or shapes:
        raise CheckpointError(f"{what}: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}, "
                              f"other shapes {shapes[:5]}")


def load_initial_weights(model, folder: str | Path, rank: int = 0) -> None:
    """checkpoint.init_from: load an export folder's weights into a freshly built (not yet
    parallelized) model, checking names and shapes."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint.init_from: {path} is missing (make it with `mor export RUN_DIR -o {folder}`)")
    state = read_safetensors(path)
    check_fits(state, model, f"checkpoint.init_from: {path} does not fit this config's model")
    state["train_step"] = torch.zeros_like(state["train_step"])  # a new run: warmups start over
    model.load_state_dict(state)
    if rank == 0:
        log.info("initial weights from %s", path)


def load_exported(path: str | Path):
    """The model of an export folder, in eval mode."""
    from mor_dist.config import load_config
    from mor_dist.model import build_model

    path = Path(path)
    model = build_model(load_config(path / "config.yaml"))
    state = read_safetensors(path / "model.safetensors")
    check_fits(state, model, f"{path / 'model.safetensors'}: does not fit {path / 'config.yaml'}")
    model.load_state_dict(state)
    return model.eval()


def read_safetensors(path: Path) -> dict:
    """The tensors of an export, or a CheckpointError naming the file (missing, empty, truncated)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing; export a run with `mor export RUN_DIR -o {path.parent}`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); export the run again") from None
