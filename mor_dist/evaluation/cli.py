"""`mor eval RUN_OR_EXPORT --tasks ...`: flags, checked like every other `mor` flag."""

from __future__ import annotations

from mor_dist.config import ConfigError, flag_type


def _tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks: empty; name at least one task, e.g. --tasks hellaswag,piqa")
    return names


def _eval(args) -> int:
    from mor_dist.evaluation.harness import evaluate

    evaluate(args.model, _tasks(args.tasks), limit=args.limit, num_fewshot=args.num_fewshot,
             include_paths=args.include_path, batch_size=args.batch_size, device=args.device, step=args.step)
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="few-shot benchmarks with lm-evaluation-harness (through the Hugging Face export)",
        description="Scores a run folder (its latest checkpoint, or --step; exported to RUN/eval/hf_export/) or "
        "an export folder with lm-evaluation-harness, prints the harness's table, writes JSON under FOLDER/eval/ "
        "and, for a run folder, TensorBoard scalars eval/<task>/<metric>. Needs `pip install -e '.[eval]'`. "
        "Without hub access, give local task YAMLs with --include-path (docs/evaluation.md).")
    p.add_argument("model", help="run folder or export folder")
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. hellaswag,piqa,arc_easy")
    p.add_argument("--limit", type=flag_type(">= 1"), help="at most this many documents per task")
    p.add_argument("--num-fewshot", type=flag_type(">= 0"), help="solved examples in front (default: the task's)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="folder of extra task YAMLs (repeatable), e.g. local copies of benchmarks")
    p.add_argument("--batch-size", type=flag_type(">= 1"), default=8)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--step", type=flag_type(">= 0"), help="run folder: checkpoint step (default: latest)")
    p.set_defaults(func=_eval)
