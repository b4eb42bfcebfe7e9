"""`mor submit`: render the sbatch script for a run, write it into the run folder, submit it."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from mor_dist.launcher import jobs
from mor_dist.launcher.render import TEMPLATE, render


class SubmitError(ValueError):
    pass


def training_args(config: Path, overrides: list[str], run_dir: Path, force: bool) -> list[str]:
    # Absolute config and run folder: the job may start from anywhere and must hit the same folder.
    overrides = [o for o in overrides if not o.startswith("logging.run_dir=")] + [f"logging.run_dir={run_dir}"]
    return ["-m", "mor_dist.cli", "train", str(config), *overrides] + (["--force"] if force else [])


def script_values(args, run_dir: Path, command: list[str]) -> dict:
    gpus = args.gpus_per_node or None
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
        "log": jobs.slurm_dir(run_dir) / jobs.LOG_PATTERN,
        "workdir": Path.cwd(),
        "extra_sbatch": "\n".join(f"#SBATCH {a}" for a in args.sbatch) or None,
        "run_dir": shlex.quote(str(run_dir)),
        "python": shlex.quote(sys.executable),
        "train_args": " ".join(shlex.quote(c) for c in command),
    }


def check_run_dir(cfg, force: bool) -> None:
    """Refuse now, not in the queue, a run folder that holds a run with another config."""
    from omegaconf import OmegaConf

    from mor_dist.training.run_dir import CONFIG_FILE, RunDirError, config_differences

    saved = Path(cfg.logging.run_dir) / CONFIG_FILE
    if saved.is_file() and not force:
        diffs = config_differences(OmegaConf.to_container(OmegaConf.load(saved), resolve=True),
                                   OmegaConf.to_container(cfg, resolve=True))
        if diffs:
            raise RunDirError(f"{cfg.logging.run_dir} holds a run with a different config ({saved}):\n  "
                              + "\n  ".join(diffs) + "\nUse another logging.run_dir, or pass --force.")


def submit(args) -> int:
    try:
        return _submit(args)
    except (SubmitError, RuntimeError, KeyError, OSError) as e:
        print(f"mor submit: {e}", file=sys.stderr)
        return 2


def _submit(args) -> int:
    from mor_dist.config import load_config

    if args.chain < 1 or args.nodes < 1:
        raise SubmitError("--chain and --nodes must be >= 1")
    config = Path(args.config).resolve()
    cfg = load_config(config, args.overrides)  # a bad config fails here, not after queueing
    run_dir = Path(cfg.logging.run_dir).resolve()
    cfg.logging.run_dir = str(run_dir)
    check_run_dir(cfg, args.force)
    template = Path(args.template) if args.template else TEMPLATE
    script = render(template.read_text(), script_values(args, run_dir, training_args(
        config, args.overrides, run_dir, args.force)))
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
    p.add_argument("--time", help="time limit, e.g. 24:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument("--signal-lead", type=int, default=300,
                   help="seconds before the time limit at which the job checkpoints and requeues (default 300)")
    p.add_argument("--max-restarts", type=int, default=20, help="requeues allowed before the job gives up")
    p.add_argument("--chain", type=int, default=1,
                   help="submit N jobs, each --dependency=afterany on the previous (runs longer than one allocation)")
    p.add_argument("--dependency", help="sbatch dependency of the first job, e.g. afterany:1234")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH line, e.g. --sbatch=--exclusive (repeatable)")
    p.add_argument("--template", help=f"sbatch template (default {TEMPLATE})")
    p.add_argument("--force", action="store_true", help="passed to mor train: continue a run with a changed config")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.set_defaults(func=submit)
