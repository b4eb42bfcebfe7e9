"""`mor status RUN`: the run's SLURM job, training step, last checkpoint, TensorBoard folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mor_dist.launcher import jobs
from mor_dist.launcher.validate import UserError, one_line_usage_errors, report_errors

FAILED_STATES = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "CANCELLED", "PREEMPTED"}
STEP_LINE = re.compile(r"step (\d+)/(\d+) \| loss ([\d.naif]+)")
# Lines worth showing first when a job failed: mor's own user errors, exceptions, srun's verdicts.
ERROR_LINE = re.compile(r"^(mor: |srun: error|\w*(Error|Exception)\b)|mor-slurm: |Error: ")
# Why a pending job waits, in words (scontrol's Reason; any other is shown as SLURM spells it).
PENDING_REASONS = {
    "Priority": "jobs of higher priority are ahead of it",
    "Resources": "waiting for nodes to become free",
    "Dependency": "waiting for the job it depends on to end",
    "BeginTime": "held until its begin time (a requeued job waits there briefly)",
    "JobHeldUser": "held by its user; `scontrol release JOBID` lets it go",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "a node it needs is down, drained or reserved",
    "PartitionTimeLimit": "its --time exceeds the partition's limit: it will not start; resubmit with a shorter --time",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows: it will not start; resubmit with fewer",
    "DependencyNeverSatisfied": "its dependency can never be met: it will not start; cancel it",
    "QOSMaxJobsPerUserLimit": "your quality-of-service limit on running jobs is reached",
}


def pending_line(info: dict) -> str:
    """A pending job's reason and SLURM's expected start (known once the scheduler has planned it)."""
    reason = info.get("Reason", "None")
    why = PENDING_REASONS.get(reason.split(",")[0], "")
    start = info.get("StartTime", "Unknown")
    when = "not estimated yet" if start in ("Unknown", "None", "N/A", "") else start
    return f"pending     {reason}{': ' + why if why else ''}; expected start {when}"


def last_step(run_dir: Path) -> tuple[int, int, str] | None:
    """(step, total, loss) of the last step line in train.log."""
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    found = None
    for line in log.read_text(errors="replace").splitlines():
        m = STEP_LINE.search(line)
        if m:
            found = (int(m.group(1)), int(m.group(2)), m.group(3))
    return found


def last_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    path = run_dir / "checkpoints" / latest.read_text(errors="replace").strip()
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):  # missing or damaged: the status line shows '?' (resume names the fault)
        meta = {}
    return path, meta if isinstance(meta, dict) else {}


def error_summary(log: Path, tail: int = 15) -> list[str]:
    if not log.is_file():
        return [f"(no log at {log})"]
    lines = log.read_text(errors="replace").splitlines()
    errors = [line for line in lines if ERROR_LINE.search(line)]
    return ([*errors[-5:], "--- last lines of the log:"] if errors else []) + lines[-tail:]


def status(args) -> int:
    return report_errors("mor", _status, args)


def _status(args) -> int:
    run_dir = Path(args.run).resolve()
    records = jobs.read_jobs(run_dir)
    if not records and not (run_dir / "config.yaml").is_file():
        raise UserError(str(run_dir), "is not a run folder (no slurm/jobs.json, no config.yaml)",
                        "give the logging.run_dir of a submitted or trained run")
    print(f"run         {run_dir}")
    code = 0
    for i, rec in enumerate(records):
        info = jobs.show_job(rec["job_id"])
        latest = i == len(records) - 1
        if info is None:
            print(f"job         {rec['job_id']}  (unknown to scontrol: finished long ago?) submitted {rec['submitted']}")
            continue
        state = info.get("JobState", "?")
        reason = info.get("Reason", "None")
        nodes = info.get("NodeList", "?")
        print(f"job         {rec['job_id']}  {state}  exit {info.get('ExitCode', '?')}  restarts "
              f"{info.get('Restarts', '0')}  nodes {'-' if nodes in ('', '(null)') else nodes}  runtime "
              f"{info.get('RunTime', '?')}" + (f"  reason {reason}" if reason not in ("None", "") else ""))
        if state == "PENDING":
            print(pending_line(info))
        if latest and (state in FAILED_STATES or info.get("ExitCode", "0:0") != "0:0"):
            code = 1
            print(f"error       job {rec['job_id']} {state}; from its log {rec['log']}:")
            for line in error_summary(Path(rec["log"])):
                print(f"  {line}")
    step = last_step(run_dir)
    if step:
        print(f"step        {step[0]}/{step[1]}  loss {step[2]}  (train.log)")
    ckpt = last_checkpoint(run_dir)
    if ckpt:
        print(f"checkpoint  {ckpt[0]}  (step {ckpt[1].get('step', '?')}, {ckpt[1].get('tokens_seen', '?')} tokens)")
    else:
        print("checkpoint  none yet")
    print(f"tensorboard tensorboard --logdir {run_dir / 'tensorboard'}")
    if records:
        print(f"log         {records[-1]['log']}")
    return code


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="SLURM job state, step, last checkpoint and TensorBoard path of a run",
                       description="Reads the job ids mor submit recorded in RUN/slurm/jobs.json and asks "
                       "scontrol about them. Exit code 1 when the latest job failed.")
    p.add_argument("run", help="run folder (logging.run_dir)")
    p.set_defaults(func=status)
    one_line_usage_errors(p)
