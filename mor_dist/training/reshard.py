"""Resume at another data-parallel size: convert the checkpoint to DeepSpeed's universal format once
(rank 0), then every rank loads that with `load_universal`. The original checkpoint is left as is.

Tensor- and pipeline-parallel sizes are part of a checkpoint's layout: a resume that changes them is
refused by name before anything is built; `mor export` + `checkpoint.init_from` carries the weights
over to another layout."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from mor_dist.training.checkpoint import CheckpointError, CheckpointManager

log = logging.getLogger("mor.train")


def check_resume_layout(run_dir: Path, tp: int, pp: int) -> Path | None:
    """The run's latest checkpoint (None without one), refused when saved at other tensor- or
    pipeline-parallel sizes (called before the run folder is touched)."""
    ckpt = CheckpointManager(run_dir, 1)
    latest = ckpt.latest()
    if latest is None:
        return None
    meta = ckpt.verify(latest)
    saved = meta.get("config", {}).get("parallel", {})
    was = (saved.get("tensor", 1), saved.get("pipeline", 1))
    if was != (tp, pp):
        raise CheckpointError(
            f"checkpoint {latest} was saved with parallel.tensor={was[0]} parallel.pipeline={was[1]}; this run has "
            f"parallel.tensor={tp} parallel.pipeline={pp}. A resumed run keeps its tensor- and pipeline-parallel "
            f"sizes (the data-parallel size may change). Resume with the saved sizes, or export the weights "
            f"(mor export {latest.parent.parent} OUT) and start a new run from them with checkpoint.init_from=OUT"
        )
    return latest


def universal_source(run_dir: Path, keep_last: int, dp: int, rank: int) -> Path | None:
    """The folder to load instead of `latest` when its data-parallel size differs from `dp`, after
    making it; None when no conversion is needed (no checkpoint, or the same size)."""
    ckpt = CheckpointManager(run_dir, keep_last)
    latest = ckpt.latest()
    if latest is None:
        return None
    meta = ckpt.verify(latest)
    saved_dp = meta.get("data_parallel_size", meta["world_size"])
    if saved_dp == dp:
        return None
    out = run_dir / "universal" / latest.name
    if rank == 0 and not (out / "done").is_file():
        log.info("checkpoint %s was saved at data-parallel size %d, resuming at %d: converting to a universal "
                 "checkpoint in %s", latest, saved_dp, dp, out)
        tmp = out.with_name(out.name + ".tmp")
        result = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(latest),
             "--output_folder", str(tmp / latest.name), "--num_extract_workers", "1", "--num_merge_workers", "1"],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise CheckpointError(f"converting {latest} to a universal checkpoint failed:\n{result.stderr[-3000:]}")
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
        (out / "done").write_text("ok\n")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return out / latest.name
