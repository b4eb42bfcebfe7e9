"""Sharded, atomic checkpoints in a run folder.

    run_dir/checkpoints/latest              -> "step_00000100" (moved only after a complete save)
    run_dir/checkpoints/step_00000100/      one folder per step:
        meta.json                           step, tokens seen, loader state, config, file list
        rng_rank{r}.pt                      RNG of every rank
        ...                                 model / optimizer shards written by the train module

A save goes to `step_N.tmp/`; every rank writes and flushes its files; after a barrier rank 0 writes
meta.json (listing every file with its size), renames the folder and only then moves `latest`. A kill
at any point leaves the previous checkpoint and `latest` untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

META = "meta.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:08d}"

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not path.is_dir():
            raise CheckpointError(f"{pointer} points to {name!r}, but {path} does not exist")
        return path

    def save(self, step: int, meta: dict, write_shards: Callable[[Path], None]) -> Path:
        """Collective: every rank calls it. write_shards(tmp_dir) writes this rank's model/optimizer
        files. Returns the final folder."""
        final = self.root / self.step_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()
        write_shards(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
        _fsync_tree(tmp)
        _barrier()
        if _rank() == 0:
            files = {
                str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            meta = dict(meta, step=step, files=files, world_size=dist.get_world_size() if dist.is_initialized() else 1)
            _write_atomic(tmp / META, json.dumps(meta, indent=1, default=str))
            if final.exists():  # a checkpoint of this step from an earlier attempt: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / LATEST, final.name)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in steps[: -self.keep_last]:
            shutil.rmtree(old)
        for stale in self.root.glob("step_*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale)

    def verify(self, path: Path) -> dict:
        """meta.json of a checkpoint folder, after checking every file it lists is there, whole."""
        meta_path = path / META
        if not meta_path.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {meta_path} is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"checkpoint metadata {meta_path} is corrupt: {e}") from None
        for rel, size in meta["files"].items():
            f = path / rel
            if not f.is_file():
                raise CheckpointError(f"checkpoint file missing: {f} (listed in {meta_path})")
            if f.stat().st_size != size:
                raise CheckpointError(
                    f"checkpoint file {f} has {f.stat().st_size} bytes, {meta_path} recorded {size}: truncated or replaced"
                )
        return meta

    def restore_rng(self, path: Path, meta: dict) -> None:
        """This rank's RNG, when the checkpoint has one for it (a resized run re-seeds the rest)."""
        f = path / f"rng_rank{_rank()}.pt"
        if f.is_file():
            set_rng_state(torch.load(f, weights_only=False))
