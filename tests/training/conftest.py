"""A small prepared dataset and a way to run the real `mor` command against it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, real_text_bytes


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from mor_dist.data_pipeline.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("data")
    text = root / "corpus.txt"
    text.write_bytes(real_text_bytes(300_000))
    out = root / "ds"
    prepare_dataset(out, [str(text)], seq_len=32, vocab_size=512, val_fraction=0.05, shard_samples=256,
                    workers=1, progress=False)
    return out


def tiny_overrides(dataset: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "model.vocab_size": 512, "data.seq_len": 32, "data.dataset_dir": str(dataset), "data.num_workers": 0,
        "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.eval_interval": 3,
        "train.eval_batches": 2, "logging.log_interval": 1, "logging.run_dir": str(run_dir),
        "checkpoint.interval": 3, "checkpoint.keep_last": 3,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def mor_env() -> dict:
    env = dict(os.environ)
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_mor(args: list[str], torchrun: int = 0, timeout: int = 300, port: int = 29651) -> subprocess.CompletedProcess:
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
               f"--master_port={port}", "-m", "mor_dist.cli", *args]
    else:
        cmd = [sys.executable, "-m", "mor_dist.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=mor_env(), capture_output=True, text=True, timeout=timeout)


def tb_events(run_dir: Path):
    """TensorBoard's own reader over the run's events (RUN/tensorboard/<run name>/, one run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def tb_scalars(run_dir: Path) -> dict:
    """Every scalar tag -> {step: value}. Scalars are written in tensor form (the scalars plugin's
    tensors), as TensorBoard's current summary API writes them."""
    from tensorboard.util import tensor_util

    acc = tb_events(run_dir)
    tags = [t for t in acc.Tags()["tensors"] if acc.SummaryMetadata(t).plugin_data.plugin_name == "scalars"]
    return {tag: {e.step: tensor_util.make_ndarray(e.tensor_proto).item() for e in acc.Tensors(tag)} for tag in tags}
