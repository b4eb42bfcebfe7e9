"""`mor export`: one consolidated safetensors file plus the config and the run's tokenizer, for
inference and evaluation."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import torch

from mor_dist.checkpoint import CheckpointError, CheckpointManager
from mor_dist.checkpoint.safe_load import guarded_loads, safe_load
from mor_dist.run_folder.files import replacing

log = logging.getLogger("mor.export")


@contextlib.contextmanager
def deepspeed_output_to_stderr():
    """DeepSpeed's readers print progress ("Processing zero checkpoint ...") and log through a
    handler on stdout (the accelerator warning of its first import among them). stdout is the
    result of `mor generate --ids` and `mor serve-bench`, so for the duration both go to stderr;
    afterwards its handlers write where they would have without this."""
    stdout = sys.stdout
    before = {}
    if "deepspeed.utils.logging" in sys.modules:
        before = {id(h): h.stream for h in sys.modules["deepspeed.utils.logging"].logger.handlers
                  if isinstance(h, logging.StreamHandler)}
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.logging import logger  # a first import makes its handler on the redirected stdout

        handlers = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
        for h in handlers:
            h.stream = sys.stderr  # not setStream: it flushes the old stream, which may be closed
        try:
            yield
        finally:
            for h in handlers:
                h.stream = before.get(id(h), stdout)


def consolidated_state(run_dir: Path, step: int | None = None) -> tuple[dict, dict, Path]:
    """fp32 model state of a checkpoint of any layout (tensor/pipeline shards merged by
    merge_shards.py; ZeRO-3 with tensor parallelism through the universal copy), its meta.json, and
    its folder."""
    mgr = CheckpointManager(run_dir, keep_last=1)
    folder = mgr.latest() if step is None else mgr.root / mgr.step_name(step)
    if folder is None or not folder.is_dir():
        raise CheckpointError(f"{mgr.root}: no checkpoint {'latest' if step is None else step}; "
                              f"train the run first, or pick one of {[p.name for p in mgr.step_folders()]}")
    try:
        with deepspeed_output_to_stderr():
            state, meta = _read_checkpoint(mgr, folder)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_older_steps_hint(mgr, folder) if step is None else ''}") from None
    return state, meta, folder


def _older_steps_hint(mgr: CheckpointManager, folder: Path) -> str:
    """'; ... --step N ...' naming the checkpoints older than the latest one, which failed to read."""
    from mor_dist.checkpoint.store import step_of

    try:
        latest = step_of(folder)
        older = [step_of(p) for p in mgr.step_folders() if step_of(p) < latest]
    except (ValueError, IndexError):
        return ""
    if not older:
        return ""
    return (f"; an older checkpoint may be intact: pass --step N to use it "
            f"(this run also has step{'s' if len(older) > 1 else ''} {', '.join(map(str, older))})")


def _read_checkpoint(mgr: CheckpointManager, folder: Path) -> tuple[dict, dict]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

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
        return read_model_state(out), meta
    if tp > 1 or pp > 1:
        from mor_dist.training.merge_shards import merge_parallel

        return merge_parallel(folder, tp, pp), meta
    with guarded_loads():  # DeepSpeed's reader calls torch.load itself
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    # Buffers that carry routing state (warmup counters, loss-free bias) sit beside the parameters.
    module_file = folder / "mp_rank_00_model_states.pt"
    if module_file.is_file():
        saved = safe_load(module_file)
        for name in saved.get("buffer_names", []):
            if name in saved["module"]:
                state[name] = saved["module"][name].float() if saved["module"][name].is_floating_point() else saved["module"][name]
    return state, meta


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before anything is read, an output path that is (or lies under) a file."""
    from mor_dist.config import ConfigError

    for p in (out_dir, *out_dir.parents):
        if p.exists() or p.is_symlink():
            if p.is_dir():
                return
            what = "is a file, not a folder" if p == out_dir else f"lies under {p}, which is a file"
            if not p.exists():
                what = "is a broken symbolic link" if p == out_dir else f"lies under {p}, a broken symbolic link"
            raise ConfigError(f"{out_dir}: {what}; give -o a new or existing folder (the export writes "
                              "model.safetensors, config.yaml and tokenizer.json into it)")


def training_dirs(cfg, run_dir: Path, workdir: str | None = None) -> list[Path]:
    """The folders a run's relative data paths may be relative to, most likely first: the folder
    `mor train` ran in (recorded in each checkpoint's meta.json as `workdir`; for older checkpoints,
    the run folder's path without logging.run_dir, when that was relative), the current folder,
    then the run folder's parents."""
    run = Path(os.path.abspath(run_dir))
    dirs: list[Path] = [Path(workdir)] if workdir else []
    recorded = Path(os.path.normpath(str(cfg.logging.run_dir))) if cfg.logging.run_dir else None
    if recorded is not None and not recorded.is_absolute() and ".." not in recorded.parts:
        for candidate in (run, Path(os.path.realpath(run))):
            n = len(recorded.parts)  # 0 for ".": training ran in the run folder itself
            if n == 0:
                dirs.append(candidate)
            elif candidate.parts[-n:] == recorded.parts and len(candidate.parts) > n:
                dirs.append(candidate.parents[n - 1])
    dirs.append(Path.cwd())
    dirs.extend(run.parents)
    return list(dict.fromkeys(dirs))


def _rebase(loc: str, base: Path) -> str:
    from mor_dist.data_pipeline import remote

    path = remote.local_path(loc)
    if path is None or path.is_absolute() or remote.scheme(loc):
        return loc  # a URL, a pipe: command or an absolute path is where it is
    return str(base / path)


def find_tokenizer(cfg, run_dir: Path, meta: dict | None = None) -> tuple[Path | None, list[str]]:
    """(the tokenizer file the run trained with, where it was looked for).

    data.tokenizer, else the tokenizer beside the dataset's manifest (the first source of a mixture);
    a relative path is tried against each of training_dirs() (meta: the checkpoint's meta.json, with
    the folder training ran in). A dataset found there must be the one the run read (its fingerprint
    in meta's loader state), not another of the same vocabulary. Local paths only: a location in
    object storage or a `pipe:` command is not fetched or run for a lookup (a config.yaml is data;
    --tokenizer gives such a tokenizer). (None, tried) when not found."""
    from mor_dist.data_pipeline import remote
    from mor_dist.data_pipeline.errors import DataError
    from mor_dist.data_pipeline.loader import config_sources
    from mor_dist.data_pipeline.manifest import load_manifest

    meta = meta or {}
    data = cfg.data
    sources = (meta.get("loader") or {}).get("sources") or []
    read = sources[0].get("fingerprint") if sources and isinstance(sources[0], dict) else None
    tried: list[str] = []
    for base in training_dirs(cfg, run_dir, meta.get("workdir")):
        if data.tokenizer:
            loc = _rebase(str(data.tokenizer), base)
        else:
            source = _rebase(config_sources(data)[0][0], base)
            if remote.local_path(source) is None:  # the same from every folder
                return None, [*tried, f"{source} (not a local path: not fetched)"]
            try:
                m = load_manifest(source)
            except DataError:
                if remote.join(source, "tokenizer.json") not in tried:
                    tried.append(remote.join(source, "tokenizer.json"))
                continue
            loc = m.locate(m.tokenizer["file"])
            if read is not None and m.fingerprint("train") != read:  # another dataset than the run read
                note = f"{loc} (another dataset than the run's)"
                if note not in tried:
                    tried.append(note)
                continue
        path = remote.local_path(loc)
        if path is None:
            return None, [*tried, f"{loc} (not a local path: not fetched)"]
        if str(path) in tried:
            continue
        tried.append(str(path))
        if path.is_file():
            return path, tried
    return None, tried


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None, hf: bool = False,
           tokenizer: str | Path | None = None) -> Path:
    """hf: also the Hugging Face files (mor_dist/hf/export.py), for AutoModelForCausalLM. tokenizer:
    the tokenizer file to ship (default: the run's, found as the run found it; not found: warned, none shipped)."""
    from safetensors.torch import save_file

    from mor_dist.config import load_config
    from mor_dist.model import build_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_out_dir(out_dir)  # before the checkpoint is read: a mistake costs nothing
    cfg = load_config(run_dir / "config.yaml")
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise CheckpointError(f"{tokenizer}: no such tokenizer file; give the tokenizer.json the run trained with")
        tok_path = Path(tokenizer)
    state, meta, folder = consolidated_state(run_dir, step)
    if tokenizer is None:
        tok_path, tried = find_tokenizer(cfg, run_dir, meta)
        if tok_path is None:  # the weights still export (a purged scratch dataset must not hold them hostage)
            from mor_dist.data_pipeline.loader import config_sources

            wanted = cfg.data.tokenizer or f"{config_sources(cfg.data)[0][0]}/tokenizer.json"
            log.warning("the run's tokenizer (%s) is not at %s%s: exporting without tokenizer.json (generate and "
                        "eval then take token ids only); give it with --tokenizer PATH", wanted,
                        ", ".join(tried[:4]), " ..." if len(tried) > 4 else "")
    with torch.device("meta"):
        model = build_model(cfg)
    check_fits(state, model, f"{folder} does not match the model of {run_dir / 'config.yaml'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    weights = out_dir / "model.safetensors"
    with replacing(weights) as tmp:
        save_file(tensors, str(tmp),
                  metadata={"step": str(meta["step"]), "tokens_seen": str(meta["tokens_seen"]), "source": str(folder)})
    with replacing(out_dir / "config.yaml") as tmp:
        tmp.write_text((run_dir / "config.yaml").read_text())
    if tok_path is not None:
        with replacing(out_dir / "tokenizer.json") as tmp:
            tmp.write_bytes(tok_path.read_bytes())
    with replacing(out_dir / "export.json") as tmp:
        tmp.write_text(json.dumps({"step": meta["step"], "source": str(folder)}, indent=1))
    if hf:
        from mor_dist.hf.export import write_hf_files

        write_hf_files(out_dir, cfg)
    log.info("exported step %d of %s to %s", meta["step"], run_dir, out_dir)
    return weights


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


def check_export(folder: str | Path, cfg) -> None:
    """The names and shapes of an export's model.safetensors (its header only: nothing is loaded)
    against the model cfg describes; CheckpointError naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    from mor_dist.model import build_model

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; export a run with `mor export RUN_DIR -o {path.parent}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); export the run again") from None
    with torch.device("meta"):
        model = build_model(cfg)
    check_fits(shapes, model, f"{path}: does not fit {Path(folder) / 'config.yaml'}")
