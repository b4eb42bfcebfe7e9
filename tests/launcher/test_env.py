"""SLURM task variables -> RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*, and the exec shim."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mor_dist.launcher.env import master_port, task_env, tasks_per_node
from tests.conftest import REPO

TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2),3,1", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[01-04]",
        "MASTER_ADDR": "gpu01"}


def test_task_env_maps_slurm_variables():
    assert task_env(TASK) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3",
                              "MASTER_PORT": str(master_port(123456))}
    assert task_env({**TASK, "MASTER_PORT": "29400"})["RANK"] == "5"
    assert "MASTER_PORT" not in task_env({**TASK, "MASTER_PORT": "29400"})


def test_tasks_per_node_and_port():
    assert [tasks_per_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert tasks_per_node("4", 0) == 4
    with pytest.raises(ValueError):
        tasks_per_node("two", 0)
    assert master_port(20000) == master_port(40000) == 20000 and 20000 <= master_port(987654321) < 40000


def test_shim_sets_the_variables_and_execs():
    code = "import os; print(os.getpid(), *(os.environ[k] for k in ('RANK','WORLD_SIZE','LOCAL_RANK','MASTER_PORT')))"
    shim = [sys.executable, "-m", "mor_dist.launcher.srun_task", "--", sys.executable, "-c", code]
    p = subprocess.Popen(shim, cwd=REPO, env=TASK | {"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=60)
    pid, rank, world, local, port = out.split()
    assert int(pid) == p.pid  # exec'd in place: srun's signals reach the training process itself
    assert (rank, world, local, port) == ("5", "8", "1", str(master_port(123456)))


def test_shim_outside_slurm_says_so():
    r = subprocess.run([sys.executable, "-m", "mor_dist.launcher.srun_task", "--", "true"], cwd=REPO,
                       env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 64 and "SLURM_PROCID is not set" in r.stderr
