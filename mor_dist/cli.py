"""`mor` command line: one subcommand per job, each a thin shell over the package."""

from __future__ import annotations

import argparse
import errno
import json
import os
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

    path = export(args.run_dir, args.out, args.step, hf=args.hf)
    print(path)
    return 0


class _Parser(argparse.ArgumentParser):
    """Flag mistakes end in one line like every other user mistake; the usage is one --help away."""

    def error(self, message: str):
        message = message.removeprefix("argument ")
        hint = "" if "; " in message else f"; see {self.prog} --help"
        if message.startswith("unrecognized arguments:") and "=" in message:
            hint = "; put key=value overrides right after the config file, before any --flag"
        self.exit(2, f"mor: {message}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    from mor_dist.config import flag_type

    parser = _Parser(prog="mor", description="Mixture-of-Recursions distributed pretraining")
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
    p.add_argument("--step", type=flag_type(">= 0"), help="checkpoint step (default: latest)")
    p.add_argument("--hf", action="store_true",
                   help="also a Hugging Face model folder (config.json, modeling code, tokenizer files) for "
                   "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)")
    p.set_defaults(func=_export)

    # Each component registers its own subcommands.
    from mor_dist.data_pipeline.cli import add_data_parser
    from mor_dist.evaluation.cli import add_eval_parser
    from mor_dist.inference.cli import add_inference_parsers
    from mor_dist.launcher.cli import add_slurm_parsers
    from mor_dist.parallel.plan import add_plan_parser

    add_plan_parser(sub)
    add_data_parser(sub)
    add_slurm_parsers(sub)
    add_inference_parsers(sub)
    add_eval_parser(sub)
    return parser


def _user_errors() -> tuple:
    """Errors whose message already says what to fix: printed without a traceback."""
    from mor_dist.checkpoint import CheckpointError
    from mor_dist.config import ConfigError
    from mor_dist.data_pipeline.errors import DataError
    from mor_dist.parallel.dims import ParallelLayoutError
    from mor_dist.run_folder import RunDirError
    from mor_dist.training.trainer import NonFiniteLossError

    return ConfigError, DataError, CheckpointError, RunDirError, NonFiniteLossError, ParallelLayoutError


# A full disk, a quota or a permission is the machine's state, not a bug: the file and the remedy say
# more than a traceback.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free space there (or write elsewhere), then run again",
    errno.EDQUOT: "free space within your quota (or write elsewhere), then run again",
    errno.EACCES: "fix the permissions of that path or its folder, or use another path",
    errno.EPERM: "fix the permissions of that path or its folder, or use another path",
    errno.EROFS: "use a path on a writable filesystem",
}


def environment_error(e: BaseException | None) -> OSError | None:
    """The disk-full / quota / permission OSError that is `e` or that `e` was raised from, if any."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
            return e
        e = e.__cause__
    return None


def environment_message(e: OSError) -> str:
    """'<file>: no space left on device; <what to do>'."""
    what = e.strerror or os.strerror(e.errno)
    what = what[:1].lower() + what[1:]
    where = f"{e.filename}: " if e.filename is not None else ""
    return f"{where}{what}; {_ENVIRONMENT_ERRNOS[e.errno]}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors = _user_errors()
    try:
        return args.func(args)
    except errors as e:
        # The message starts with the file, key or flag at fault; a long one (e.g. a list of config
        # differences) goes on after a first line that stands alone.
        print(f"mor: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        env = environment_error(e)
        if env is None:
            raise  # a bug: keep the traceback
        print(f"mor: {environment_message(env)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
