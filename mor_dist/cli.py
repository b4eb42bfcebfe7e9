"""`mor` command line: one subcommand per job, each a thin shell over the package."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from mor_dist.config import load_config
    from mor_dist.model.accounting import model_info

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(model_info(cfg), indent=2))
    return 0


def _train(args) -> int:
    from mor_dist.config import load_config
    from mor_dist.training.main import train

    return train(load_config(args.config, args.overrides), force=args.force)


def _export(args) -> int:
    from mor_dist.training.export import export

    path = export(args.run_dir, args.out, args.step)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor", description="Mixture-of-Recursions distributed pretraining")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts, layout and FLOPs of a config (no weights allocated)")
    p.add_argument("config", help="YAML config, e.g. configs/paper/360m/mor_nr3.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model.recursions=3")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "train",
        help="train (or resume) a run; also under torchrun / srun",
        description="Builds model, parallelism, data and optimizer from one config and trains. Pointed at "
        "an existing run folder (logging.run_dir) it resumes from its latest checkpoint. Exit code 75 "
        "means: preempted by SIGTERM/SIGUSR1, checkpoint written, requeue me.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/tiny/mor.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.steps=100")
    p.add_argument("--force", action="store_true", help="continue a run folder whose saved config differs")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="consolidated safetensors + config of a run's checkpoint")
    p.add_argument("run_dir", help="run folder (logging.run_dir of the run)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.set_defaults(func=_export)

    # Each component registers its own subcommands.
    from mor_dist.data_pipeline.cli import add_data_parser
    from mor_dist.inference.cli import add_inference_parsers
    from mor_dist.launcher.cli import add_slurm_parsers
    from mor_dist.parallel.plan import add_plan_parser

    add_plan_parser(sub)
    add_data_parser(sub)
    add_slurm_parsers(sub)
    add_inference_parsers(sub)
    return parser


def _user_errors() -> tuple:
    """Errors whose message already says what to fix: printed without a traceback."""
    from mor_dist.config import ConfigError
    from mor_dist.data_pipeline.errors import DataError
    from mor_dist.training.checkpoint import CheckpointError
    from mor_dist.training.run_dir import RunDirError
    from mor_dist.training.trainer import NonFiniteLossError

    return ConfigError, DataError, CheckpointError, RunDirError, NonFiniteLossError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors = _user_errors()
    try:
        return args.func(args)
    except errors as e:
        print(f"mor: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
