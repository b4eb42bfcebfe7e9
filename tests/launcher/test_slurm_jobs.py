"""Real SLURM (the local two-node cluster): train to completion, preempt -> requeue -> resume, failure."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from tests.launcher.conftest import submit, wait_for, wait_for_text
from tests.training.conftest import tb_scalars, tiny_overrides

CONFIG = "configs/tiny/mor.yaml"
STEPS = 40
PREEMPT_AT = 10


def overrides(dataset, run_dir, **extra):
    # Checkpoints only on the signal and at the end: the resume must come from the preemption save.
    values = {"train__steps": STEPS, "train__eval_interval": 0, "checkpoint__interval": 1000, **extra}
    return tiny_overrides(dataset, run_dir, **values)


@pytest.fixture(scope="module")
def two_jobs(slurm_cluster, tiny_dataset, tmp_path_factory):
    """An uninterrupted and a to-be-preempted 2-node run of the same config, submitted together (each
    takes one core of each node, so they run side by side). The preemption test runs first: the
    preempted job must still be running when it is signalled."""
    root = tmp_path_factory.mktemp("slurm_runs")
    ref, pre = root / "reference", root / "preempted"
    return {
        "ref": (ref, submit(CONFIG, overrides(tiny_dataset, ref), "--nodes=2", "--cpus-per-task=1")),
        "pre": (pre, submit(CONFIG, overrides(tiny_dataset, pre), "--nodes=2", "--cpus-per-task=1")),
    }


def mor_status(run_dir) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "mor_dist.cli", "status", str(run_dir)], capture_output=True,
                          text=True, timeout=60)


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_loss(two_jobs):
    run_dir, job = two_jobs["pre"]
    log_file = run_dir / "slurm" / f"job-{job}.log"
    wait_for_text(run_dir / "train.log", f"step {PREEMPT_AT}/{STEPS}")
    # What the scheduler does before a time limit (--signal=B:USR1) or a preemption, at once.
    subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True)
    wait_for_text(log_file, "requeueing job")
    # A requeued job is held ~2 min (BeginTime) before it may start again: release it early. Not at
    # once: slurmd refuses to relaunch a job id within the second its credential was revoked (the kill
    # of the requeue): "Job credential revoked", and the job fails.
    info = wait_for(job, states={"PENDING"}, timeout=60)
    assert info["Restarts"] == "1", info
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    info = wait_for(job)
    log = log_file.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log[-4000:])

    saved = int(log.split("checkpoint at step ")[1].split()[0])
    assert PREEMPT_AT <= saved < STEPS, log[-4000:]
    assert f"resumed from {run_dir}/checkpoints/step_{saved:08d}" in log and f"done: {STEPS} steps" in log
    assert "restart 1/" in log

    ref_dir, ref_job = two_jobs["ref"]
    wait_for(ref_job)
    ref_loss, loss = tb_scalars(ref_dir)["train/loss"], tb_scalars(run_dir)["train/loss"]
    assert loss[STEPS] == ref_loss[STEPS], (loss, ref_loss)
    st = mor_status(run_dir)
    assert "restarts 1" in st.stdout and f"step        {STEPS}/{STEPS}" in st.stdout, st.stdout


def test_two_node_job_trains_to_completion(two_jobs):
    run_dir, job = two_jobs["ref"]
    info = wait_for(job)
    log = (run_dir / "slurm" / f"job-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["NodeList"] == "node[1-2]" and "world 2 (dp 2" in log and f"done: {STEPS} steps" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert sorted(tb_scalars(run_dir)["train/loss"]) == list(range(1, STEPS + 1))
    st = mor_status(run_dir)
    assert st.returncode == 0, st.stdout + st.stderr
    assert f"{job}  COMPLETED" in st.stdout and f"step        {STEPS}/{STEPS}" in st.stdout
    assert f"checkpoints/step_{STEPS:08d}" in st.stdout and str(run_dir / "tensorboard") in st.stdout


def test_failing_job_reports_a_clear_error(slurm_cluster, tiny_dataset, tmp_path):
    run_dir = tmp_path / "failing"
    missing = tmp_path / "no_such_dataset"
    job = submit(CONFIG, tiny_overrides(tiny_dataset, run_dir, data__dataset_dir=missing, train__steps=3))
    info = wait_for(job)
    log = (run_dir / "slurm" / f"job-{job}.log").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, log[-3000:])
    assert f"mor: {missing}: " in log and "training failed with exit code 2" in log  # mor's one-line error
    st = mor_status(run_dir)
    assert st.returncode == 1
    assert f"{job}  FAILED  exit 2:0" in st.stdout and f"mor: {missing}: " in st.stdout, st.stdout


def test_requeue_limit_stops_the_loop_and_a_chained_job_continues(slurm_cluster, tiny_dataset, tmp_path):
    from mor_dist.launcher.jobs import read_jobs

    run_dir = tmp_path / "chained"
    submit(CONFIG, overrides(tiny_dataset, run_dir, train__steps=12), "--max-restarts=0", "--chain=2")
    first, second = (j["job_id"] for j in read_jobs(run_dir))
    assert read_jobs(run_dir)[1]["dependency"] == f"afterany:{first}"
    wait_for_text(run_dir / "train.log", "step 3/12")
    subprocess.run(["scancel", "--signal=USR1", "--full", first], check=True)
    info = wait_for(first)
    log = (run_dir / "slurm" / f"job-{first}.log").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "0", log[-3000:]
    assert "not requeueing: the job was already requeued 0 times (max 0)" in log
    # The next allocation of the chain picks the run up from the preemption checkpoint.
    info = wait_for(second)
    log = (run_dir / "slurm" / f"job-{second}.log").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_" in log and "done: 12 steps" in log


def test_sbatch_reads_each_quoted_value_as_given(slurm_cluster, tmp_path, capsys):
    """What sbatch itself parses out of the rendered #SBATCH lines (its own quoting, not bash's)."""
    from tests.launcher.conftest import run_cli

    odd = "it's \"odd\" #1 $(x) \\y"
    run_dir = tmp_path / "a run %j"
    rc, script, err = run_cli(capsys, ["submit", CONFIG, f"logging.run_dir={run_dir}", f"--job-name={odd}",
                                       f"--sbatch=--comment={odd}", "--dry-run"])
    assert rc == 0, err
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    r = subprocess.run(["sbatch", "-vv", "--test-only", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    parsed = dict(re.findall(r"^sbatch: (job-name|comment|output)\s+: (.*)$", r.stderr, re.M))
    assert parsed == {"job-name": odd, "comment": odd, "output": f"{tmp_path}/a run %%j/slurm/job-%j.log"}, r.stderr


def test_run_dir_with_a_space_trains_end_to_end(slurm_cluster, tiny_dataset, tmp_path):
    # The space must reach sbatch's --output quoted; the '%j' of the folder's name must stay literal.
    run_dir = tmp_path / "my run %j"
    job = submit(CONFIG, tiny_overrides(tiny_dataset, run_dir, train__steps=3, train__eval_interval=0),
                 "--cpus-per-task=1")
    info = wait_for(job)
    log_file = run_dir / "slurm" / f"job-{job}.log"
    assert log_file.is_file(), (info, sorted(map(str, tmp_path.rglob("*.log"))))
    log = log_file.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert f"run {run_dir}" in log and "done: 3 steps" in log, log[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    st = mor_status(run_dir)
    assert st.returncode == 0 and f"{job}  COMPLETED" in st.stdout, st.stdout + st.stderr
