"""`mor status` of a job that waits in the queue (real SLURM, the local cluster): why, and when."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.launcher.conftest import submit, wait_for


def test_pending_job_shows_reason_and_expected_start(slurm_cluster, tmp_path):
    run_dir = tmp_path / "later"
    # Held until a begin time, as a requeued job is: SLURM knows when it may start.
    job = submit("configs/tiny/mor.yaml", [f"logging.run_dir={run_dir}"], "--sbatch=--begin=now+2hours")
    try:
        wait_for(job, states={"PENDING"}, timeout=30)
        r = subprocess.run([sys.executable, "-m", "mor_dist.cli", "status", str(run_dir)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert re.search(rf"job +{job}  PENDING .* nodes -  ", r.stdout), r.stdout
        line = next(x for x in r.stdout.splitlines() if x.startswith("pending"))
        assert "BeginTime: held until its begin time" in line, line
        assert re.search(r"expected start \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$", line), line
    finally:
        subprocess.run(["scancel", job], timeout=30)
