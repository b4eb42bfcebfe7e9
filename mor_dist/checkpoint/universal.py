"""Layout-free checkpoints: a DeepSpeed universal checkpoint under the model's own parameter names.

A checkpoint saved at one layout (tensor x pipeline x data parallel, ZeRO stage) resumes at another
through this folder, made once per checkpoint and cached beside it (training/reshard.py decides when):

    RUN_DIR/universal/step_N/
        zero/<name>/fp32.pt exp_avg.pt exp_avg_sq.pt step.pt
                                  one folder per parameter of the single-device model (`name` as in
                                  build_model(cfg).state_dict()): full fp32 weight, Adam moments, step
                                  count -- DeepSpeed's universal files, {"param": tensor, ...}
        zero/optimizer_state.pt   hyperparameters and loss scaler, in the form ZeRO 1, 2 and 3 all read
        model_buffers.pt          the model's buffers (optimizer-step counter, router bias and loads)
        mp_rank_00_model_states.pt, zero_pp_rank_0_mp_rank_00_model_states.pt
                                  DeepSpeed's checkpoint metadata (steps, sizes; no weights), under the
                                  names ZeRO 1/2 and ZeRO-3 engines look for
        done.json                 the source's save id and layout, the conversion's time, every file's
                                  size and sha256

DeepSpeed's converter (convert_universal.py) merges the ZeRO partitions over the data-parallel ranks
and the tensor-parallel shards (patterns save_engine records: replicated, row-parallel, else dim 0);
the folders are then renamed from the engine's parameter names (`.inner`, pipeline layer indices) to
the model's, with the name map save_engine records. DeepSpeed's universal loading reads the folder
back at any layout (parallel/engine.py: load_engine).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from mor_dist.checkpoint.convert_universal import ds_to_universal
from mor_dist.checkpoint.errors import CheckpointError
from mor_dist.checkpoint.integrity import file_record, verify_files
from mor_dist.checkpoint.safe_load import safe_load
from mor_dist.checkpoint.store import write_file

NAMES = "mor_names"  # universal_checkpoint_info key: engine parameter name -> model parameter name
DONE = "done.json"
BUFFERS = "model_buffers.pt"
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
OPTIMIZER_STATE = "optimizer_state.pt"
STATES = ("fp32", "exp_avg", "exp_avg_sq", "step")


def saved_info(folder: Path) -> dict:
    """The universal_checkpoint_info a checkpoint folder's model-states file carries ({} if none)."""
    files = sorted(folder.glob("mp_rank_*_model_states.pt")) or sorted(folder.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{folder}: no DeepSpeed model-states file; the checkpoint is incomplete")
    return safe_load(files[0]).get("universal_checkpoint_info") or {}


def cached(out: Path, save_id: str | None) -> dict | None:
    """done.json of an intact conversion of the checkpoint `save_id` in `out`, else None."""
    done = out / DONE
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_bytes())
    except ValueError as e:  # truncated or overwritten: the caller converts again
        raise CheckpointError(f"{done}: not a valid record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise CheckpointError(f"{done}: not a conversion record (no file list)")
    if record.get("save_id") != save_id:
        return None  # a conversion of another checkpoint of the same step (an earlier run)
    verify_files(out, record["files"], "sha256", done)
    return record


def make(folder: Path, out: Path, buffers: dict, record: dict) -> dict:
    """Convert the checkpoint `folder` into `out` (atomically: built in out.tmp, then renamed).
    `buffers` are the model's buffers by model name; `record` goes into done.json (save id,
    layout). Returns the done record."""
    names = saved_info(folder).get(NAMES)
    if not names:
        raise CheckpointError(f"{folder}: saved without the parameter-name map a layout change needs (an older "
                              "version wrote it); resume it at its own layout")
    t0 = time.time()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ds_to_universal(folder, tmp)
    zero = tmp / "zero"
    _rename(zero, names, folder)
    _normalize_optimizer_state(zero)
    _slim_model_states(tmp)
    write_file(buffers, tmp / BUFFERS)
    for stray in ("latest_universal",):
        (tmp.parent / stray).unlink(missing_ok=True)
    files = {str(p.relative_to(tmp)): file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    done = dict(record, seconds=round(time.time() - t0, 3), parameters=len(set(names.values())), files=files)
    (tmp / DONE).write_text(json.dumps(done, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return done


def _rename(zero: Path, names: dict, folder: Path) -> None:
    """zero/<engine name> -> zero/<model name>; entries for anything else (buffers the converter
    copied as fp32) are removed: model_buffers.pt holds those exactly."""
    staged = zero.with_name("zero.renamed")
    staged.mkdir()
    for path in zero.iterdir():
        if path.is_dir() and path.name in names and not (staged / names[path.name]).exists():
            path.rename(staged / names[path.name])
    missing = sorted(set(names.values()) - {p.name for p in staged.iterdir()})
    if missing:
        raise CheckpointError(f"{folder}: the universal conversion has no optimizer state for {missing[:5]}; "
                              "the checkpoint is incomplete")
    (zero / OPTIMIZER_STATE).rename(staged / OPTIMIZER_STATE)
    shutil.rmtree(zero)
    staged.rename(zero)


def _normalize_optimizer_state(zero: Path) -> None:
    """One optimizer_state.pt for every ZeRO stage: ZeRO-1/2 read `ds_version` and `param_groups`,
    ZeRO-3 the step of `optimizer_state_dict`; ZeRO-3's converter writes no per-parameter step.pt.
    Per-layout partitions (ZeRO-3's copy of rank 0's fp32 partition, paddings) are dropped."""
    import deepspeed

    path = zero / OPTIMIZER_STATE
    sd = safe_load(path)
    step = None
    inner = sd.get("optimizer_state_dict")
    if inner is not None and inner.get("state"):
        step = inner["state"][0]["step"]
    params = sorted(p for p in zero.iterdir() if p.is_dir())
    if step is None:
        step = safe_load(params[0] / "step.pt")
    for p in params:
        if not (p / "step.pt").is_file():
            write_file(step, p / "step.pt")
    keep = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "zero_stage", "ds_version", "param_groups")
    out = {k: sd[k] for k in keep if k in sd}
    out.setdefault("ds_version", deepspeed.__version__)
    out["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd["param_groups"]}
    write_file(out, path)


def _slim_model_states(tmp: Path) -> None:
    """DeepSpeed reads its metadata (steps, sizes) from a model-states file even when the weights
    come from zero/: keep one, without the source layout's weights, under both names."""
    sources = sorted(tmp.glob("*model_states.pt"))
    meta = safe_load(sources[0])
    meta.update(module=None, optimizer=None, mp_world_size=1)  # one file, read by every rank
    for p in sources:
        p.unlink()
    for name in MODEL_STATES:
        write_file(meta, tmp / name)


# ---------------------------------------------------------------------- reading
def read_tensor(out: Path, name: str, state: str = "fp32") -> torch.Tensor:
    saved = safe_load(out / "zero" / name / f"{state}.pt")
    return saved["param"] if isinstance(saved, dict) else saved


def parameter_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "zero").iterdir() if p.is_dir())


def read_model_state(out: Path) -> dict:
    """fp32 weights and the buffers: the single-device model's state dict."""
    state = {name: read_tensor(out, name) for name in parameter_names(out)}
    state.update(safe_load(out / BUFFERS))
    return state
