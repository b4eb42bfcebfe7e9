"""What a resume may change, checked before anything is built; and resuming at another data-parallel
size: the checkpoint is converted to DeepSpeed's universal format once (rank 0), then every rank
loads that with `load_universal`. The original checkpoint is left as is.

Tensor- and pipeline-parallel sizes are part of a checkpoint's layout: a resume that changes them is
refused by name; `mor export` + `checkpoint.init_from` carries the weights over to another layout.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from mor_dist.checkpoint import CheckpointError
from mor_dist.checkpoint.integrity import file_record, verify_files

log = logging.getLogger("mor.train")

DONE = "done.json"


def check_resume_fits(folder: Path, meta: dict, cfg, dims) -> None:
    """Refuse a checkpoint saved at other tensor/pipeline sizes, or for a model of another shape
    (a --force that changed the model), before the run folder or any weight is touched."""
    saved = meta.get("config", {})
    par = saved.get("parallel", {})
    was = (par.get("tensor", 1), par.get("pipeline", 1))
    if was != (dims.tp, dims.pp):
        raise CheckpointError(
            f"{folder}: saved with parallel.tensor={was[0]} parallel.pipeline={was[1]}; this run has "
            f"parallel.tensor={dims.tp} parallel.pipeline={dims.pp}. A resumed run keeps its tensor- and "
            f"pipeline-parallel sizes (the data-parallel size may change): resume with the saved sizes, or "
            f"export the weights (mor export {folder.parent.parent} -o OUT) and start a new run from them "
            f"with checkpoint.init_from=OUT"
        )
    if "model" in saved:
        different = _shape_differences(saved, cfg)
        if different:
            raise CheckpointError(
                f"{folder}: holds a model of another shape than this config's ({'; '.join(different[:3])}); "
                "--force cannot change the model's shape. Start a new run (checkpoint.resume=false: the "
                "checkpoints are kept, set aside) or another logging.run_dir, from exported weights "
                "(checkpoint.init_from) if wanted"
            )


def _shape_differences(saved: dict, cfg) -> list[str]:
    import torch
    from omegaconf import OmegaConf

    from mor_dist.config.schema import MoRConfig
    from mor_dist.model import build_model

    try:
        old_cfg = OmegaConf.merge(OmegaConf.structured(MoRConfig), {k: saved[k] for k in ("model", "routing", "kv")
                                                                     if k in saved})
    except Exception:  # noqa: BLE001 - a config from an older schema: the load itself will tell
        return []
    with torch.device("meta"):
        old = {k: tuple(v.shape) for k, v in build_model(old_cfg).state_dict().items()}
        new = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    out = [f"{k}: {old.get(k)} saved, {new.get(k)} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return out


def universal_source(folder: Path, meta: dict, dims) -> Path | None:
    """The folder to load instead of `folder` when its data-parallel size differs from this run's,
    after making it (cached in RUN_DIR/universal/step_N, tied to the checkpoint's save id);
    None when no conversion is needed."""
    saved_dp = meta.get("data_parallel_size", meta["world_size"])
    if saved_dp == dims.dp:
        return None
    out = folder.parent.parent / "universal" / folder.name
    error = None
    if dims.rank == 0:
        try:
            if not _cached(out, meta):
                _convert(folder, out, meta, saved_dp, dims.dp)
        except CheckpointError as e:
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [error]
        dist.broadcast_object_list(errors, src=0)
        error = errors[0]
    if error is not None:
        raise error
    return out / folder.name


def _cached(out: Path, meta: dict) -> bool:
    done = out / DONE
    if not done.is_file():
        return False
    record = json.loads(done.read_text())
    if record.get("save_id") != meta.get("save_id"):
        return False  # a conversion of another checkpoint of the same step (an earlier run)
    try:
        verify_files(out, record["files"], "sha256", done)
    except CheckpointError as e:
        log.warning("cached universal checkpoint is damaged, converting again: %s", e)
        return False
    return True


def _convert(folder: Path, out: Path, meta: dict, saved_dp: int, dp: int) -> None:
    log.info("checkpoint %s was saved at data-parallel size %d, resuming at %d: converting to a universal "
             "checkpoint in %s", folder, saved_dp, dp, out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # DeepSpeed's converter, with every torch.load it makes restricted (no code from the files).
    result = subprocess.run(
        [sys.executable, "-m", "mor_dist.checkpoint.convert_universal", "--input_folder", str(folder),
         "--output_folder", str(tmp / folder.name), "--num_extract_workers", "1", "--num_merge_workers", "1"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise CheckpointError(f"{folder}: converting to a universal checkpoint failed: {lines[-1] if lines else '?'}"
                              f"\n{result.stderr[-3000:]}")
    files = {str(p.relative_to(tmp)): file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / DONE).write_text(json.dumps({"save_id": meta.get("save_id"), "files": files}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
