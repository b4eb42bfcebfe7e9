"""Faults: preemption signals, a kill in the middle of a save, NaN losses."""

import signal
import subprocess
import sys
import textwrap
import time

from mor_dist.checkpoint.safe_load import safe_load
from tests.conftest import REPO
from tests.training.conftest import mor_env, run_mor, tb_scalars, tiny_overrides

CONFIG = "configs/tiny/mor.yaml"


def test_signal_checkpoints_and_exits_for_requeue(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = ["train", CONFIG, *tiny_overrides(tiny_dataset, run, train__steps=500, checkpoint__interval=1000,
                                            train__eval_interval=0)]
    proc = subprocess.Popen([sys.executable, "-m", "mor_dist.cli", *args], cwd=REPO, env=mor_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 3/500" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    out, _ = proc.communicate(timeout=120)
    lines.append(out)
    assert proc.returncode == 75, "".join(lines)[-3000:]
    latest = (run / "checkpoints" / "latest").read_text()
    step = int(latest.split("_")[1])
    assert 3 <= step < 500 and f"checkpoint at step {step} written" in "".join(lines)

    # The requeued job runs the same command and carries on from there.
    r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, run, train__steps=step + 2, checkpoint__interval=1000,
                                                  train__eval_interval=0)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"resumed from {run}/checkpoints/step_{step:08d}" in r.stdout


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from pathlib import Path
    from mor_dist.checkpoint import CheckpointManager
    m = CheckpointManager(sys.argv[1], keep_last=2)
    m.save(1, {"tokens_seen": 1}, lambda d: torch.save({"w": torch.ones(3)}, d / "model.pt"))
    def half_written(d):
        torch.save({"w": torch.zeros(3)}, d / "model.pt")
        (d / "optim.pt").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    m.save(2, {"tokens_seen": 2}, half_written)
""")


def test_kill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], cwd=REPO, env=mor_env())
    assert r.returncode == -signal.SIGKILL
    from mor_dist.checkpoint import CheckpointManager

    m = CheckpointManager(tmp_path, keep_last=2)
    latest = m.latest()
    assert latest.name == "step_00000001"
    assert m.verify(latest)["tokens_seen"] == 1
    import torch

    assert torch.equal(torch.load(latest / "model.pt")["w"], torch.ones(3))
    assert (tmp_path / "checkpoints" / "step_00000002.tmp").is_dir()  # the half-written one
    # The next complete save replaces the leftovers.
    m.save(2, {"tokens_seen": 2}, lambda d: torch.save({"w": torch.full((3,), 2.0)}, d / "model.pt"))
    assert m.latest().name == "step_00000002" and not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_nan_loss_stops_with_the_step_or_is_skipped(tiny_dataset, tmp_path):
    # Weights this large overflow fp32 in the first RMSNorm: the loss is NaN from step 1.
    stop = tmp_path / "stop"
    r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, stop, train__steps=5, model__init_std=1e20,
                                                 train__eval_interval=0, checkpoint__interval=1000)])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "non-finite loss (nan) at step 1" in r.stderr and "train.nan_policy=skip" in r.stderr
    assert not (stop / "checkpoints" / "latest").exists()  # nothing bad was saved

    skip = tmp_path / "skip"
    t0 = time.time()
    r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, skip, train__steps=4, model__init_std=1e20,
                                                 train__eval_interval=0, checkpoint__interval=1000,
                                                 train__nan_policy="skip")])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    skipped = tb_scalars(skip)["train/skipped_steps"]
    assert skipped == {1: 1, 2: 2, 3: 3, 4: 4} and "update skipped" in r.stdout, time.time() - t0
    import torch

    state = safe_load(skip / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt")
    assert all(torch.isfinite(v).all() for v in state["module"].values() if v.is_floating_point())


def test_peak_tflops_from_the_device_table_or_measured():
    import torch

    from mor_dist.training.peak_flops import device_peak_tflops, measured_cpu_tflops, resolve_peak_tflops

    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA H200") == 989.0 and device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("AMD Instinct MI300X") == 1307.0 and device_peak_tflops("Tesla T4") is None
    assert resolve_peak_tflops(123.0) == 123.0  # set by hand: used as is
    cpu = measured_cpu_tflops(seconds=0.05, n=256)
    assert 1e-4 < cpu < 100  # a real measurement of this machine, not a constant
    # A bf16 run is measured against a bf16 matmul (bf16 instructions run it ~2x fp32's rate).
    assert 1e-4 < measured_cpu_tflops(seconds=0.05, n=256, dtype=torch.bfloat16) < 100
