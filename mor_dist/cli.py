"""`mor` command line: one subcommand per job, each a thin shell over the package.

One grammar: CONFIG (or --config for the data commands) then `key=value` overrides anywhere among
the flags, `--set key=value` as an alias. Only the invoked command's module is imported, so that
`mor --help` and `mor status` do not pay for importing torch.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from importlib import import_module, metadata

# name -> (module, function that registers it on the subparsers, one-line help). The help is here so
# that `mor --help` lists every command without importing any; a test holds it equal to the parsers'.
COMMANDS = {
    "train": (__name__, "add_train_parser", "train (or resume) a run; also under torchrun / srun"),
    "info": (__name__, "add_info_parser", "parameter counts, layout and FLOPs of a config (no weights allocated)"),
    "config": (__name__, "add_config_parser", "print the resolved config (base: files and overrides applied) as YAML"),
    "plan": ("mor_dist.parallel.plan", "add_plan_parser",
             "per-rank memory of a parallel layout (no weights allocated); exit 1 if it does not fit"),
    "data": ("mor_dist.data_pipeline.cli", "add_data_parser",
             "prepare datasets: tokenizer, WebDataset shards, manifest"),
    "export": (__name__, "add_export_parser", "consolidated safetensors + config of a run's checkpoint"),
    "submit": ("mor_dist.launcher.cli", "add_slurm_parsers",
               "submit a training run to SLURM (sbatch script written into the run folder)"),
    "status": ("mor_dist.launcher.cli", "add_slurm_parsers",
               "SLURM job state, step, last checkpoint and TensorBoard path of a run"),
    "generate": ("mor_dist.inference.cli", "add_inference_parsers",
                 "decode a prompt with the KV caches of the model's routing"),
    "serve-bench": ("mor_dist.inference.cli", "add_inference_parsers",
                    "synthetic requests through continuous depth-wise batching"),
    "eval": ("mor_dist.evaluation.cli", "add_eval_parser",
             "few-shot benchmarks with lm-evaluation-harness (through the Hugging Face export)"),
}
# A positional `key=value` among paths (data inputs, a checkpoint) is a config override.
OVERRIDE = re.compile(r"[A-Za-z_][\w.\[\]]*=", re.ASCII)
PATH_POSITIONALS = ("checkpoint", "dataset", "inputs")


def _info(args) -> int:
    from mor_dist.config import load_config
    from mor_dist.model.accounting import model_info

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(model_info(cfg), indent=2))
    return 0


def _config(args) -> int:
    from mor_dist.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _train(args) -> int:
    from mor_dist.config import load_config
    from mor_dist.training import main

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        return main.dry_run(cfg, force=args.force)
    return main.train(cfg, force=args.force)


def _export(args) -> int:
    from mor_dist.training.export import export

    path = export(args.run_dir, args.out, args.step, hf=args.hf, tokenizer=args.tokenizer)
    print(path)
    return 0


class _Parser(argparse.ArgumentParser):
    """Flag mistakes end in one line like every other user mistake; the usage is one --help away.
    A command's own parser reads positionals and flags intermixed: overrides may come after flags."""

    _intermixed = False

    def error(self, message: str):
        message = message.removeprefix("argument ")
        hint = "" if "; " in message else f"; see {self.prog} --help"
        self.exit(2, f"mor: {message}{hint}\n")

    def parse_known_args(self, args=None, namespace=None):
        if self._subparsers is not None or self._intermixed:
            return super().parse_known_args(args, namespace)
        self._intermixed = True  # parse_known_intermixed_args calls back here twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False


def _overrides_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides (dotlist), anywhere after the config, e.g. train.steps=100")


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help=COMMANDS["train"][2],
        description="Builds model, parallelism, data and optimizer from one config and trains. Pointed at "
        "an existing run folder (logging.run_dir) it resumes from its latest checkpoint. Exit code 75 "
        "means: preempted by SIGTERM/SIGUSR1, checkpoint written, requeue me.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/tiny/mor.yaml")
    _overrides_arg(p)
    p.add_argument("--force", action="store_true", help="continue a run folder whose saved config differs")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything a start checks (config, layout, memory plan, data, run folder), "
                   "print it, start nothing and write nothing")
    p.set_defaults(func=_train)


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help=COMMANDS["info"][2])
    p.add_argument("config", help="YAML config, e.g. configs/paper/360m/mor_nr3.yaml")
    _overrides_arg(p)
    p.set_defaults(func=_info)


def add_config_parser(sub) -> None:
    p = sub.add_parser("config", help=COMMANDS["config"][2],
                       description="Prints the config a run of these arguments would use, every key resolved: "
                       "the same YAML a run writes to RUN_DIR/config.yaml.")
    p.add_argument("config", help="YAML config, e.g. configs/tiny/mor.yaml")
    _overrides_arg(p)
    p.set_defaults(func=_config)


def add_export_parser(sub) -> None:
    from mor_dist.config import flag_type

    p = sub.add_parser("export", help=COMMANDS["export"][2])
    p.add_argument("run_dir", help="run folder (logging.run_dir of the run)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--step", type=flag_type(">= 0"), help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", help="the tokenizer.json to ship (default: the run's dataset's, found where "
                   "the run read it)")
    p.add_argument("--hf", action="store_true",
                   help="also a Hugging Face model folder (config.json, modeling code, tokenizer files) for "
                   "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)")
    p.set_defaults(func=_export)


def _version() -> str:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"mor_dist {version('mor_dist')} (torch {version('torch')}, deepspeed {version('deepspeed')})"


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The `mor` parser. Only `command`'s module is imported and its parser built ("*": all of them);
    the other commands are listed by name and help."""
    parser = _Parser(prog="mor", description="Mixture-of-Recursions distributed pretraining")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, adder, _) in COMMANDS.items():
        if command in ("*", name) and name not in sub.choices:  # one adder may register several
            getattr(import_module(module), adder)(sub)
    for name, (_, _, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)
    for leaf in _leaves(sub):
        _add_set_alias(leaf)
    return parser


def _leaves(sub) -> list[argparse.ArgumentParser]:
    out = []
    for p in dict.fromkeys(sub.choices.values()):
        nested = p._subparsers._group_actions[0].choices.values() if p._subparsers is not None else None
        out += list(nested) if nested else [p]
    return out


def _add_set_alias(p: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable) next to positional overrides, for every command that takes them."""
    options = {o for a in p._actions for o in a.option_strings}
    if "--set" not in options and any(a.dest == "overrides" for a in p._actions):
        p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="a config override, the same as a positional KEY=VALUE; repeatable")


def _gather_overrides(args) -> None:
    """args.overrides: positional key=value items (also those among path positionals), then --set."""
    if not (hasattr(args, "overrides") or hasattr(args, "set_overrides")):
        return
    found = []
    for name in PATH_POSITIONALS:
        value = getattr(args, name, None)
        if isinstance(value, list):
            found += [v for v in value if OVERRIDE.match(v)]
            setattr(args, name, [v for v in value if not OVERRIDE.match(v)])
        elif isinstance(value, str) and OVERRIDE.match(value):
            found.append(value)
            setattr(args, name, None)
    given = getattr(args, "overrides", None) or []
    args.overrides = found + list(given) + list(getattr(args, "set_overrides", None) or [])


# Errors whose message already says what to fix: printed without a traceback. Named by module, so
# that none is imported to check (an error can only come from a module that is loaded).
USER_ERRORS = [("mor_dist.config.validate", "ConfigError"), ("mor_dist.data_pipeline.errors", "DataError"),
               ("mor_dist.checkpoint.errors", "CheckpointError"), ("mor_dist.run_folder.config_file", "RunDirError"),
               ("mor_dist.training.trainer", "NonFiniteLossError"), ("mor_dist.parallel.dims", "ParallelLayoutError")]


def is_user_error(e: BaseException) -> bool:
    return any(module in sys.modules and isinstance(e, getattr(sys.modules[module], name))
               for module, name in USER_ERRORS)


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
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    _gather_overrides(args)
    try:
        return args.func(args)
    except Exception as e:
        if is_user_error(e):
            # The message starts with the file, key or flag at fault; a long one (e.g. a list of config
            # differences) goes on after a first line that stands alone.
            print(f"mor: {e}", file=sys.stderr)
            return 2
        env = environment_error(e)
        if env is None:
            raise  # a bug: keep the traceback
        print(f"mor: {environment_message(env)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
