"""One `mor train` per run folder: an exclusive lock held by rank 0 for the life of the process.

A POSIX record lock (fcntl.lockf) on RUN_DIR/run.lock: the kernel (or the NFS lock manager) drops it
when the holder dies however it dies, so a lock left by a killed job is simply taken over. The file
also says who holds it, for the message a second job gets.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from mor_dist.run_folder.config_file import RunDirError

log = logging.getLogger("mor.train")

LOCK_FILE = "run.lock"


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that left no record"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, since {holder.get('since')}"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def _read(self, fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            return {}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read(fd)
            os.close(fd)
            if e.errno == errno.ENOLCK:
                log.warning("%s: this filesystem does not support locks; a second job in this folder would "
                            "not be detected", self.path)
                return self
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise RunDirError(
                    f"{self.path.parent}: in use by another `mor train` ({_describe(holder)}); wait for it to "
                    "end or cancel it, or use another logging.run_dir"
                ) from None
            raise
        previous = self._read(fd)
        if previous:  # its holder is gone: the lock would not have been granted otherwise
            log.warning("%s: taking over the lock of a run that ended without releasing it (%s)", self.path,
                        _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no holder record: the next start has nothing to take over
            os.close(self._fd)
            self._fd = None
