"""A real local SLURM cluster (slurm/local_cluster.sh) for the whole session, and job helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.training.conftest import tiny_dataset  # noqa: F401  (the session fixture, shared)

CLUSTER = REPO / "slurm" / "local_cluster.sh"
STATE_DIR = Path(os.environ.get("MOR_SLURM_DIR", "/tmp/mor-slurm"))
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (daemons, /etc/hosts, apt)"
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "MOR_SLURM_DIR": str(STATE_DIR)}
    install = subprocess.run([str(CLUSTER), "install"], env=env, capture_output=True, text=True, timeout=600)
    if install.returncode:
        pytest.skip(f"SLURM packages could not be installed: {install.stderr.strip()[-500:]}")
    up = subprocess.run([str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=120)
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(STATE_DIR / "slurm.conf")  # sbatch/scontrol here and in mor status
    try:
        assert up.returncode == 0, f"local cluster did not come up:\n{up.stdout}\n{up.stderr}"
        yield STATE_DIR
    finally:
        if not os.environ.get("MOR_SLURM_KEEP"):  # keep it (and its logs) up for debugging
            subprocess.run([str(CLUSTER), "down"], env=env, timeout=120)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf


def job_state(job_id: str) -> dict:
    from mor_dist.launcher.jobs import show_job

    return show_job(job_id) or {}


def wait_for(job_id: str, states=DONE_STATES, timeout: float = 180) -> dict:
    """Poll scontrol (sbatch --wait answers tens of seconds late here)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_state(job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job_state(job_id)}")


def wait_for_text(path: Path, text: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout}s")


def submit(config: str, overrides: list[str], *flags: str) -> str:
    """`mor submit` in this process; returns the (last) job id it recorded."""
    from mor_dist.cli import main
    from mor_dist.launcher.jobs import read_jobs

    run_dir = Path(next(o for o in overrides if o.startswith("logging.run_dir=")).split("=", 1)[1])
    assert main(["submit", config, *overrides, *flags]) == 0
    return read_jobs(run_dir)[-1]["job_id"]


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`mor ARGV` in this process: exit code, stdout, stderr."""
    from mor_dist.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def cli_error(capsys, argv: list[str]) -> str:
    """A `mor` command that must fail on a user mistake: exit 2, one line on stderr, no traceback."""
    rc, out, err = run_cli(capsys, argv)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, (rc, out, err)
    return err
