"""The run folder's record of its SLURM jobs (run_dir/slurm/jobs.json) and scontrol queries."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

from mor_dist.launcher.validate import UserError

SLURM_DIR = "slurm"  # inside the run folder: the rendered script, job logs, jobs.json
JOBS_FILE = "jobs.json"
SCRIPT_FILE = "train.sbatch"
LOG_PATTERN = "job-%j.log"  # sbatch expands %j to the job id
RECORD_KEYS = {"job_id", "submitted", "log"}  # what mor status reads of each job in jobs.json


def slurm_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SLURM_DIR


def log_path(run_dir: Path, job_id: str) -> Path:
    return slurm_dir(run_dir) / LOG_PATTERN.replace("%j", str(job_id))


def read_jobs(run_dir: Path) -> list[dict]:
    path = slurm_dir(run_dir) / JOBS_FILE
    if not path.is_file():
        return []
    fix = "restore it, or move it aside to start a new record"
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(str(path), f"is not valid JSON ({e})", fix) from None
    if not (isinstance(records, list) and all(isinstance(r, dict) and RECORD_KEYS <= r.keys() for r in records)):
        raise UserError(str(path), "is not a job record written by mor submit", fix)
    return records


def record_job(run_dir: Path, job_id: str, dependency: str | None) -> None:
    jobs = read_jobs(run_dir) + [{"job_id": str(job_id), "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "dependency": dependency, "log": str(log_path(run_dir, job_id))}]
    path = slurm_dir(run_dir) / JOBS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jobs, indent=1) + "\n")
    tmp.replace(path)


def sbatch(script: Path, dependency: str | None = None) -> str:
    cmd = ["sbatch", "--parsable"] + ([f"--dependency={dependency}"] if dependency else []) + [str(script)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("sbatch", "not found", "run mor submit where SLURM is installed, or use --dry-run") from None
    if r.returncode:
        raise UserError("sbatch", f"{shlex.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}",
                        "fix what it names (see the script with --dry-run)")
    return r.stdout.strip().split(";")[0]  # "jobid[;cluster]"


def show_job(job_id: str) -> dict | None:
    """scontrol's fields of one job (JobState, ExitCode, Restarts, ...); None when it does not know it
    (never existed, or finished longer ago than the cluster's MinJobAge)."""
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    except FileNotFoundError:  # not on a SLURM host: the run folder still tells the rest
        return None
    if r.returncode or not r.stdout.strip():
        return None
    fields = {}
    # One line of Key=Value pairs; values may hold spaces, keys never do.
    for token in re.split(r"\s+(?=[\w:/.]+=)", r.stdout.strip()):
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields
