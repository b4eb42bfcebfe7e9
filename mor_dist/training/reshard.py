"""What a resume may change, checked before anything is built; and resuming at another layout.

A checkpoint resumes at any layout of the same model: tensor, pipeline and data-parallel sizes and
the ZeRO stage (1, 2, 3) and the precision (fp32, bf16) may all differ from the saved ones. At another layout, rank 0 converts the
checkpoint once into a layout-free copy (checkpoint/universal.py: DeepSpeed's universal checkpoint
under the model's own parameter names), cached in RUN_DIR/universal/step_N and tied to the
checkpoint's save id; every rank then loads that with DeepSpeed's universal loading. Parameters, Adam
moments and step counts, the model's buffers (optimizer-step counter, router bias) come over; the step,
the data position and the lr schedule come from meta.json as in any resume. The original checkpoint is
left as it is. The log says what was converted, from which layout to which, and how long it took.

Refused, by name and before the run folder is touched: a model of another shape (a --force that
changed it), and a layout change on either side of which the optimizer is a plain torch one (ZeRO
stage 0 in fp32: its state is in no form DeepSpeed's converter or universal loader reads).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from mor_dist.checkpoint import CheckpointError

log = logging.getLogger("mor.train")

CONVERSION_TIMEOUT = timedelta(hours=3)  # how long the other ranks wait for rank 0's conversion


def saved_layout(meta: dict, folder: Path | None = None) -> dict:
    """The layout a checkpoint was saved at, from its meta.json. The training precision belongs to it
    where it names the optimizer's files (DeepSpeed's bf16 optimizer writes bf16_zero_* files;
    train.dtype=auto means fp32 on a CPU, bf16 on a GPU: the same config moved between them changes
    it). Checkpoints from before meta.json recorded it are told by their optimizer files; None when
    they have none (a plain torch optimizer at ZeRO stage 0)."""
    par = meta.get("config", {}).get("parallel", {})
    tp, pp = par.get("tensor", 1), par.get("pipeline", 1)
    dp = meta.get("data_parallel_size", meta["world_size"] // (tp * pp))
    bf16 = meta.get("bf16")
    if bf16 is None and folder is not None:
        files = [f.name for f in Path(folder).glob("*optim_states.pt")]
        bf16 = any(f.startswith("bf16_") for f in files) if files else None
    return {"tensor": tp, "pipeline": pp, "data": dp, "zero_stage": par.get("zero_stage", 1),
            "bf16": None if bf16 is None else bool(bf16)}


def run_layout(cfg, dims) -> dict:
    from mor_dist.parallel.engine import uses_bf16

    return {"tensor": dims.tp, "pipeline": dims.pp, "data": dims.dp, "zero_stage": cfg.parallel.zero_stage,
            "bf16": uses_bf16(cfg)}


def _plain_torch_optimizer(layout: dict) -> bool:
    """DeepSpeed steps torch's AdamW itself (no ZeRO files, no universal loading): ZeRO stage 0,
    except bf16 pipelines (they get DeepSpeed's bf16 optimizer)."""
    return layout["zero_stage"] == 0 and not (layout["bf16"] and layout["pipeline"] > 1)


def layout_changed(saved: dict, now: dict) -> bool:
    """Whether the checkpoint must go through its universal copy. Precision counts only where it names
    the optimizer's files: between plain torch optimizers the weights and moments load as they are
    (cast), and an unknown saved precision is taken as unchanged."""
    keys = ["tensor", "pipeline", "data", "zero_stage"]
    if saved["bf16"] is not None and not (_plain_torch_optimizer(saved) and _plain_torch_optimizer(now)):
        keys.append("bf16")
    return any(saved[k] != now[k] for k in keys)


def describe(layout: dict) -> str:
    precision = {True: ", bf16", False: ", fp32", None: ""}[layout.get("bf16")]
    return (f"tensor {layout['tensor']} x pipeline {layout['pipeline']} x data {layout['data']}, "
            f"ZeRO-{layout['zero_stage']}{precision}")


def check_resume_fits(folder: Path, meta: dict, cfg, dims) -> None:
    """Refuse a checkpoint for a model of another shape, or a layout change a plain torch optimizer
    takes part in, before the run folder or any weight is touched."""
    saved, now = saved_layout(meta, folder), run_layout(cfg, dims)
    if layout_changed(saved, now):
        if not any(folder.glob("*optim_states.pt")):
            raise CheckpointError(
                f"{folder}: saved at {describe(saved)} by a plain torch optimizer (parallel.zero_stage=0, no ZeRO "
                f"optimizer files), so it resumes only at that layout, not at {describe(now)}; resume with the "
                "saved sizes, zero_stage and train.dtype, or export the weights and start a new run from them "
                "(checkpoint.init_from)"
            )
        if _plain_torch_optimizer(now):
            raise CheckpointError(
                f"parallel.zero_stage: 0 (a plain torch optimizer) cannot take over a checkpoint saved at "
                f"{describe(saved)} ({folder}); use parallel.zero_stage=1, or resume at the saved layout"
            )
        if (saved["tensor"], saved["pipeline"]) != (now["tensor"], now["pipeline"]) and not meta.get("reshardable"):
            raise CheckpointError(
                f"{folder}: saved by an older version without the parameter-name map a tensor/pipeline change needs; "
                f"resume it at parallel.tensor={saved['tensor']} parallel.pipeline={saved['pipeline']} (the data-parallel "
                f"size and ZeRO stage may change), or export the weights (mor export {folder.parent.parent} -o OUT) and "
                "start a new run from them with checkpoint.init_from=OUT"
            )
    check_model_shape(folder, meta, cfg)


def check_model_shape(folder: Path, meta: dict, cfg) -> None:
    """Refuse a checkpoint of a model of another shape than cfg's (a --force that changed it)."""
    if "model" in meta.get("config", {}):
        different = _shape_differences(meta["config"], cfg)
        if different:
            raise CheckpointError(
                f"{folder}: holds a model of another shape than this config's ({'; '.join(different[:3])}); "
                "--force cannot change the model's shape. Start a new run (checkpoint.resume=false: the "
                "checkpoints are kept, set aside) or another logging.run_dir, from exported weights "
                "(checkpoint.init_from) if wanted"
            )


def _saved_model(saved: dict):
    """The single-device model of a saved config, on the meta device (None for an older schema)."""
    import torch
    from omegaconf import OmegaConf

    from mor_dist.config.schema import MoRConfig
    from mor_dist.model import build_model

    try:
        old_cfg = OmegaConf.merge(OmegaConf.structured(MoRConfig), {k: saved[k] for k in ("model", "routing", "kv")
                                                                     if k in saved})
    except Exception:  # noqa: BLE001 - a config from an older schema: the load itself will tell
        return None
    with torch.device("meta"):
        return build_model(old_cfg)


def _shape_differences(saved: dict, cfg) -> list[str]:
    import torch

    from mor_dist.model import build_model

    old_model = _saved_model(saved)
    if old_model is None:
        return []
    with torch.device("meta"):
        new = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    old = {k: tuple(v.shape) for k, v in old_model.state_dict().items()}
    return [f"{k}: {old.get(k)} saved, {new.get(k)} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def universal_source(folder: Path, meta: dict, cfg, dims) -> Path | None:
    """The folder to load instead of `folder` when this run's layout differs from the saved one,
    after making it (rank 0; cached); None when the checkpoint loads as it is."""
    saved, now = saved_layout(meta, folder), run_layout(cfg, dims)
    if not layout_changed(saved, now):
        return None
    out = folder.parent.parent / "universal" / folder.name
    group = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        # The other ranks wait while rank 0 converts; for a billion-parameter checkpoint that can
        # outlast NCCL's default 10-minute timeout, so they wait on a gloo group with a longer one.
        group = dist.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)
    error = None
    if dims.rank == 0:
        try:
            ensure_universal(folder, meta, out, f"for a resume at {describe(now)}")
        except CheckpointError as e:
            error = e
    if group is not None:
        errors = [error]
        dist.broadcast_object_list(errors, src=0, group=group)
        error = errors[0]
    if error is not None:
        raise error
    return out


def ensure_universal(folder: Path, meta: dict, out: Path, why: str) -> dict:
    """The universal copy of `folder` in `out`: the cached one when intact and of this checkpoint,
    else a new conversion. Logs which, from which layout, and the time it took. One process."""
    from mor_dist.checkpoint import universal

    layout = saved_layout(meta, folder)
    try:
        done = universal.cached(out, meta.get("save_id"))
    except CheckpointError as e:
        log.warning("cached universal checkpoint is damaged, converting again: %s", e)
        done = None
    if done is not None:
        log.info("checkpoint %s (saved at %s) %s: using its universal copy cached in %s (converted in %.1fs)",
                 folder, describe(layout), why, out, done["seconds"])
        return done
    log.info("checkpoint %s was saved at %s; %s it is converted to a universal checkpoint in %s",
             folder, describe(layout), why, out)
    done = universal.make(folder, out, saved_buffers(folder, meta),
                          {"save_id": meta.get("save_id"), "source": str(folder), "layout": layout})
    log.info("converted %s: %d parameters (fp32 weights, Adam moments, step counts) and the model's buffers, from %s, "
             "in %.1fs", folder.name, done["parameters"], describe(layout), done["seconds"])
    return done


def saved_buffers(folder: Path, meta: dict) -> dict:
    """The model's persistent buffers (optimizer-step counter, router bias and loads) as the
    checkpoint holds them, by model name."""
    from mor_dist.training.merge_shards import read_rank_state

    model = _saved_model(meta.get("config", {}))
    if model is None:
        raise CheckpointError(f"{folder}: its meta.json config is from an older schema; resume it at its own layout")
    names = set(model.state_dict()) - {n for n, _ in model.named_parameters()}
    layout = saved_layout(meta)
    state = read_rank_state(folder, tp_rank=0, pp=layout["pipeline"])
    missing = sorted(names - set(state))
    if missing:
        raise CheckpointError(f"{folder}: holds no {missing[:3]}; the checkpoint is incomplete")
    return {n: state[n] for n in sorted(names)}
