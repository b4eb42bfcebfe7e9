"""One `mor train` per run folder: a second holder is refused by name, a dead holder's lock is taken."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mor_dist.run_folder import RunDirError, RunLock
from tests.conftest import REPO

HOLD = "import sys, time; from mor_dist.run_folder import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def holder(run_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO), SLURM_JOB_ID="4242")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    proc = holder(tmp_path)
    try:
        with pytest.raises(RunDirError) as e:
            RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path}: in use by another `mor train`")
        assert f"pid {proc.pid} on host {socket.gethostname()}, SLURM job 4242" in msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kernel released the dead process's lock; its record is still in the file.
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="mor.train"):
        lock = RunLock(tmp_path).acquire()
    assert f"taking over the lock of a run that ended without releasing it (pid {proc.pid}" in caplog.text
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / "run.lock").read_text() == ""  # a clean end leaves nothing to take over
    again = RunLock(tmp_path).acquire()
    again.release()


def test_lock_is_released_when_the_holder_exits(tmp_path):
    proc = holder(tmp_path)
    proc.terminate()
    proc.wait()
    t0 = time.time()
    RunLock(tmp_path).acquire().release()
    assert time.time() - t0 < 5
