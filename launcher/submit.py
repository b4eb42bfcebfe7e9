"""`mor submit`: render the sbatch script for a run, write it into the run folder, submit it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mor_dist.launcher import jobs, validate
from mor_dist.launcher.render import TEMPLATE, render
from mor_dist.launcher.validate import UserError

# Smallest value of each numeric flag (None: not given).
MINIMUM = {"--nodes": 1, "--chain": 1, "--max-restarts": 0, "--gpus-per-node": 0, "--tasks-per-node": 1,
           "--cpus-per-task": 1, "--signal-lead": 1}


def check_flags(args) -> None:
    """Every flag that reaches the script or sbatch, before anything is loaded or queued."""
    for flag, low in MINIMUM.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < low:
            raise UserError(flag, f"must be >= {low}, got {value}", f"give {flag} {low} or more")
    if args.signal_lead > validate.MAX_SIGNAL_LEAD:
        raise UserError("--signal-lead", f"must be <= {validate.MAX_SIGNAL_LEAD} (sbatch's limit), got "
                        f"{args.signal_lead}", "give a shorter lead")
    limit = validate.time_limit(args.time) if args.time is not None else None
    if limit is not None and args.signal_lead >= limit:
        # The warning would come at once: the job would requeue itself without training.
        raise UserError("--signal-lead", f"{args.signal_lead} s is not shorter than --time {args.time} ({limit} s)",
                        "give a shorter --signal-lead or a longer --time")
    if args.job_name is not None:
        validate.printable("--job-name", args.job_name)
    if args.partition is not None:
        validate.slurm_names("--partition", args.partition, several=True)
    if args.account is not None:
        validate.slurm_names("--account", args.account, several=False)
    if args.dependency is not None:
        validate.dependency(args.dependency)
    for option in args.sbatch:
        validate.sbatch_option(option)
    validate.printable("config", args.config)
    for item in args.overrides:
        validate.printable(item.split("=", 1)[0], item)  # named by its key, e.g. logging.run_dir


def training_args(config: Path, overrides: list[str], run_dir: Path, force: bool) -> list[str]:
    # Absolute config and run folder: the job may start from anywhere and must hit the same folder.
    overrides = [o for o in overrides if not o.startswith("logging.run_dir=")] + [f"logging.run_dir={run_dir}"]
    return ["-m", "mor_dist.cli", "train", str(config), *overrides] + (["--force"] if force else [])


def script_values(args, run_dir: Path, command: list[str]) -> dict:
    """Raw values: render() quotes each for the line it lands on."""
    gpus = args.gpus_per_node or None
    # %j in --output is SLURM's job id; a '%' of the run folder itself is written '%%'.
    log = str(jobs.slurm_dir(run_dir)).replace("%", "%%") + "/" + jobs.LOG_PATTERN
    return {
        "job_name": args.job_name or f"mor-{run_dir.name}",
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node or gpus or 1,  # one task per GPU
        "gpus_per_node": gpus,
        "cpus_per_task": args.cpus_per_task,
        "time": args.time,
        "partition": args.partition,
        "account": args.account,
        "signal_lead": args.signal_lead,
        "max_restarts": args.max_restarts,
        "log": log,
        "workdir": validate.printable("current directory", str(Path.cwd())),
        "extra_sbatch": list(args.sbatch),
        "run_dir": str(run_dir),
        "python": validate.printable("python (sys.executable)", sys.executable),
        "train_args": command,
    }


def submit(args) -> int:
    from mor_dist.config import ConfigError
    from mor_dist.run_folder import RunDirError

    return validate.report_errors("mor", _submit, args, (ConfigError, RunDirError))


def _submit(args) -> int:
    from mor_dist.config import load_config
    from mor_dist.run_folder import check_config

    check_flags(args)
    # Checked again once resolved: a symlink may lead anywhere.
    config = Path(validate.printable("config", str(Path(args.config).resolve())))
    cfg = load_config(config, args.overrides)  # a bad config fails here, not after queueing
    if not cfg.checkpoint.resume:
        # Every start of the job (a requeue after preemption, the next job of --chain) runs the same
        # command: each would set the last one's checkpoints aside and begin again, for ever.
        raise UserError("checkpoint.resume", "is false, but a requeued or chained job must resume its own "
                        "checkpoints", "submit without it; for a fresh run give a new logging.run_dir "
                        "(a folder's earlier checkpoints are never overwritten)")
    validate.run_dir(cfg.logging.run_dir)
    run_dir = Path(validate.run_dir(str(Path(cfg.logging.run_dir).resolve())))
    cfg.logging.run_dir = str(run_dir)
    check_config(cfg, args.force)  # a folder holding a run of another config is refused now, not in the queue
    jobs.read_jobs(run_dir)  # a damaged job record is refused before a job is queued, not after
    template = Path(args.template) if args.template else TEMPLATE
    try:
        text = template.read_text()
    except UnicodeDecodeError:
        raise UserError("--template", f"{template} is not a text file", "give an sbatch template") from None
    script = render(text, script_values(args, run_dir, training_args(config, args.overrides, run_dir, args.force)),
                    where=str(template))
    if args.dry_run:
        print(script, end="")
        return 0

    jobs.slurm_dir(run_dir).mkdir(parents=True, exist_ok=True)
    path = jobs.slurm_dir(run_dir) / jobs.SCRIPT_FILE
    path.write_text(script)
    os.chmod(path, 0o755)
    dependency = args.dependency
    for i in range(args.chain):
        # Each chained job runs the same script: it resumes where the previous allocation stopped.
        job_id = jobs.sbatch(path, dependency)
        jobs.record_job(run_dir, job_id, dependency)
        print(f"submitted job {job_id}" + (f" (after {dependency})" if dependency else "") + f": {path}")
        dependency = f"afterany:{job_id}"
    print(f"log: {jobs.log_path(run_dir, job_id)}\nstatus: mor status {run_dir}")
    return 0


def add_submit_parser(sub) -> None:
    p = sub.add_parser(
        "submit", help="submit a training run to SLURM (sbatch script written into the run folder)",
        description="Renders slurm/train.sbatch for CONFIG, writes it to RUN_DIR/slurm/train.sbatch and "
        "submits it. The job checkpoints and requeues itself on its time-limit warning or a USR1.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/tiny/mor.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides for mor train, e.g. train.steps=1000")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU (0: CPU-only)")
    p.add_argument("--tasks-per-node", type=int, help="training ranks per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--time", help="time limit in an sbatch form, e.g. 24:00:00, 2-00, 90 (minutes), UNLIMITED")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument("--signal-lead", type=int, default=300,
                   help="seconds before the time limit at which the job checkpoints and requeues (default 300; "
                   "shorter than --time)")
    p.add_argument("--max-restarts", type=int, default=20, help="requeues allowed before the job gives up")
    p.add_argument("--chain", type=int, default=1,
                   help="submit N jobs, each --dependency=afterany on the previous (runs longer than one allocation)")
    p.add_argument("--dependency", help="sbatch dependency of the first job, e.g. afterany:1234")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="one extra sbatch option, e.g. --sbatch=--exclusive (repeatable)")
    p.add_argument("--template", help=f"sbatch template (default {TEMPLATE})")
    p.add_argument("--force", action="store_true", help="passed to mor train: continue a run with a changed config")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.set_defaults(func=submit)
    validate.one_line_usage_errors(p)
