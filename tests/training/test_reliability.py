"""Trust, end to end through `mor train`: no run lost, no code from checkpoint files, one job per
folder, failed starts that leave no trace, a full or read-only disk that ends in one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mor_dist.checkpoint import CheckpointManager
from tests.conftest import REPO
from tests.training.conftest import mor_env, run_mor, tiny_overrides

CONFIG = "configs/tiny/mor.yaml"
QUIET = {"train__eval_interval": 0, "logging__tensorboard": "false"}


def train(dataset, run_dir, *extra, env=None, **kw):
    args = ["train", CONFIG, *tiny_overrides(dataset, run_dir, **(QUIET | kw)), *extra]
    if env is None:
        return run_mor(args)
    return subprocess.run([sys.executable, "-m", "mor_dist.cli", *args], cwd=REPO, env=mor_env() | env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(r) -> str:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("mor: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def step_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def start(dataset, run_dir, **kw) -> subprocess.Popen:
    args = ["train", CONFIG, *tiny_overrides(dataset, run_dir, **(QUIET | kw))]
    return subprocess.Popen([sys.executable, "-m", "mor_dist.cli", *args], cwd=REPO, env=mor_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc, text: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError("".join(lines)[-3000:])


def test_failed_starts_leave_the_folder_as_it_was_and_new_runs_keep_old_checkpoints(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    r = train(tiny_dataset, run, train__steps=4, checkpoint__interval=2, checkpoint__keep_last=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    saved = (run / "config.yaml").read_text()

    # --force with another model shape: refused before anything is written, by the checkpoint's name.
    r = train(tiny_dataset, run, "--force", train__steps=6, model__d_model=96, model__n_heads=4)
    line = one_line_error(r)
    assert line.startswith(f"mor: {run}/checkpoints/step_00000004: holds a model of another shape"), line
    assert (run / "config.yaml").read_text() == saved and not list(run.glob("config.yaml.before-force*"))
    r = run_mor(["export", str(run), "-o", str(tmp_path / "export")])
    assert r.returncode == 0, r.stderr[-2000:]

    # A new run in the same folder (the reported case: old step 2/4, new checkpoints every step).
    r = train(tiny_dataset, run, train__steps=2, checkpoint__interval=1, checkpoint__keep_last=2,
              checkpoint__resume="false")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("set_aside_")]
    assert len(aside) == 1 and f"they are kept, moved to {aside[0]}" in r.stdout
    assert sorted(p.name for p in aside[0].iterdir()) == ["latest", "step_00000002", "step_00000004"]
    assert step_names(run) == ["step_00000001", "step_00000002"]
    r = train(tiny_dataset, run, train__steps=3, checkpoint__interval=1, checkpoint__keep_last=2)
    assert r.returncode == 0 and f"resumed from {run}/checkpoints/step_00000002" in r.stdout, r.stdout[-2000:]

    # A first start pointed at a missing dataset writes nothing that refuses the corrected rerun.
    fresh = tmp_path / "fresh"
    r = train(tiny_dataset, fresh, train__steps=1, data__dataset_dir=str(tmp_path / "nope"))
    line = one_line_error(r)
    assert str(tmp_path / "nope") in line and not (fresh / "config.yaml").exists(), line
    r = train(tiny_dataset, fresh, train__steps=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_kill_between_rename_and_latest_then_preemption_keeps_every_checkpoint(tiny_dataset, tmp_path):
    # keep_last=1: killed after step_4 is in place but before `latest` names it (still step_2).
    run = tmp_path / "run"
    r = train(tiny_dataset, run, env={"MOR_CHECKPOINT_FAULT": "rename latest@2"}, train__steps=6,
              checkpoint__interval=2, checkpoint__keep_last=1)
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert step_names(run) == ["step_00000002", "step_00000004"]

    # The requeued job resumes from `latest` and is preempted at step 3.
    proc = start(tiny_dataset, run, train__steps=6, checkpoint__interval=2, checkpoint__keep_last=1)
    lines = wait_for(proc, "step 3/6")
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 75 and "resumed from" in out, out[-3000:]
    latest = (run / "checkpoints" / "latest").read_text()
    assert (run / "checkpoints" / latest / "meta.json").is_file()  # the old pruning deleted this one
    r = train(tiny_dataset, run, train__steps=6, checkpoint__interval=2, checkpoint__keep_last=1)
    assert r.returncode == 0 and f"resumed from {run}/checkpoints/{latest}" in r.stdout, r.stdout[-3000:]
    assert step_names(run) == ["step_00000006"]


def _rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and fix its size and sha256 in meta.json, as an attacker could."""
    (folder / name).write_bytes(data)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "meta.json").write_text(json.dumps(meta))


CRAFTED = """
import os, pickle, sys
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[1],))
sys.stdout.buffer.write(pickle.dumps({"module": Payload()}))
"""


def test_crafted_pickles_and_damaged_files_are_refused_by_name(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    r = train(tiny_dataset, run, train__steps=4, checkpoint__interval=2, checkpoint__keep_last=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    pwned = tmp_path / "PWNED"
    payload = subprocess.run([sys.executable, "-c", CRAFTED, str(pwned)], capture_output=True, check=True).stdout
    step4 = run / "checkpoints" / "step_00000004"
    original = (step4 / "mp_rank_00_model_states.pt").read_bytes()

    _rewrite(step4, "mp_rank_00_model_states.pt", payload)
    for args in (["export", str(run), "-o", str(tmp_path / "export")],
                 ["generate", str(run), "--ids", "--prompt", "1,2,3", "--max-new-tokens", "2"]):
        line = one_line_error(run_mor(args))
        assert line.startswith(f"mor: {step4}/mp_rank_00_model_states.pt: refused to load"), line
    line = one_line_error(train(tiny_dataset, run, train__steps=6, checkpoint__interval=2))
    assert line.startswith(f"mor: {step4}/mp_rank_00_model_states.pt: refused to load"), line
    _rewrite(step4, "mp_rank_00_model_states.pt", original)
    rng = (step4 / "rng_rank0.pt").read_bytes()
    _rewrite(step4, "rng_rank0.pt", payload)
    line = one_line_error(train(tiny_dataset, run, train__steps=6, checkpoint__interval=2))
    assert line.startswith(f"mor: {step4}/rng_rank0.pt: refused to load"), line
    assert not pwned.exists()
    _rewrite(step4, "rng_rank0.pt", rng)

    # 4 KiB overwritten inside a file (same size): named, and the resume falls back to step 2.
    victim = next(step4.glob("*optim_states.pt"))
    data = bytearray(victim.read_bytes())
    data[1000:5096] = os.urandom(4096)
    victim.write_bytes(bytes(data))
    line = one_line_error(run_mor(["export", str(run), "-o", str(tmp_path / "export")]))
    assert line.startswith(f"mor: {victim}: contents differ from the sha256"), line
    assert line.endswith("; an older checkpoint may be intact: pass --step N to use it (this run also has step 2)"), line
    r = run_mor(["export", str(run), "-o", str(tmp_path / "export"), "--step", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = train(tiny_dataset, run, train__steps=6, checkpoint__interval=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"not resuming from a damaged checkpoint: {victim}: contents differ" in r.stdout
    assert f"resumed from {run}/checkpoints/step_00000002" in r.stdout
    assert CheckpointManager(run).resolve_resume()[0].name == "step_00000006"


def test_second_training_in_one_folder_is_refused_by_name(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    first = start(tiny_dataset, run, train__steps=500, checkpoint__interval=1000)
    try:
        wait_for(first, "step 1/500")
        line = one_line_error(train(tiny_dataset, run, train__steps=500, checkpoint__interval=1000))
        assert line.startswith(f"mor: {run}: in use by another `mor train` (pid {first.pid} on host"), line
    finally:
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=120)[0]
    assert first.returncode == 75, out[-2000:]


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs: one tiny-model checkpoint (~10 MiB) fits, two do not."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"a full disk is made with a size-limited tmpfs, which needs root: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_and_read_only_folders_end_in_one_line(tiny_dataset, small_disk):
    run = small_disk / "run"
    r = train(tiny_dataset, run, train__steps=3, checkpoint__interval=1, checkpoint__keep_last=1)
    line = one_line_error(r)
    assert "no space left on device while writing a checkpoint; `latest` still names step_00000001" in line, line
    assert CheckpointManager(run).resolve_resume()[0].name == "step_00000001"
    assert not list((run / "checkpoints").glob("*.tmp"))

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    line = one_line_error(train(tiny_dataset, small_disk / "other", train__steps=1))
    assert str(small_disk / "other") in line and "read-only file system" in line, line
