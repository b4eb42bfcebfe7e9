"""`mor eval`: lm-evaluation-harness on a run's model, through its Hugging Face export.

The model is evaluated as any Hugging Face model is, by lm-eval's own `hf` model class, but built
from this installation's code (mor_dist/hf/loading.py: MoRForCausalLM of mor_dist/hf/modeling_mor.py,
causal routing, the decisions inference makes) and handed to the harness as an object. No code that
lies in the folder runs: of an export folder only config.yaml, model.safetensors and tokenizer.json
are read (its modeling_mor.py, configuration_mor.py and config.json's auto_map are not looked at), so
a folder someone else could write to cannot make `mor eval` run their code. The scores are those of
`lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True` on a folder `mor export --hf`
wrote. A run folder is exported first (its latest checkpoint, or --step) into RUN/eval/hf_export/.
Results: the harness's table on stdout, a JSON file under FOLDER/eval/, and for a run folder the
TensorBoard scalars eval/<task>/<metric> at the checkpoint's step.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path

from mor_dist.checkpoint import CheckpointError
from mor_dist.config import ConfigError

log = logging.getLogger("mor.eval")

# Metrics worth a TensorBoard curve (the harness also reports stderrs, which are not).
TB_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "exact_match", "f1")


def _require_harness():
    try:
        import lm_eval  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{e.name}: not installed; `mor eval` needs lm-evaluation-harness and transformers: "
                          "pip install -e '.[eval]'") from None


def folder_kind(path: str | Path) -> str:
    """"run" (config.yaml + checkpoints/) or "export" (model.safetensors + config.yaml)."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        return "run"
    if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        return "export"
    raise CheckpointError(f"{path}: neither a run folder (config.yaml + checkpoints/) nor an export folder "
                          "(model.safetensors + config.yaml); give one of those")


def model_folder(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """(export folder to load, checkpoint step or None). A run folder is exported, with the HF files,
    into RUN/eval/hf_export/; an export folder is used as it is (nothing is written into it)."""
    from mor_dist.training.export import export

    path = Path(path)
    if folder_kind(path) == "run":
        out = path / "eval" / "hf_export"
        export(path, out, step, hf=True)
        return out, json.loads((out / "export.json").read_text())["step"]
    if step is not None:
        raise ConfigError(f"--step: {path} is an export folder (one step); drop --step, or give the run folder")
    meta = path / "export.json"
    try:
        step = json.loads(meta.read_text()).get("step") if meta.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        step = None  # informational only: the weights and config are what is scored
    return path, step


def _check_tokenizer(hf_dir: Path) -> None:
    if not (hf_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{hf_dir / 'tokenizer.json'}: missing, and the harness needs the tokenizer; export "
                              "the run with it (`mor export RUN -o OUT --tokenizer PATH`, then `mor eval OUT`), or copy "
                              "the run's tokenizer.json there")


def task_manager(tasks: list[str], include_paths: list[str]):
    """A TaskManager that knows every requested task. Indexing the harness's built-in tasks takes
    ~10 s, so when --include-path has them all, the built-ins are left out."""
    from lm_eval.tasks import TaskManager

    for p in include_paths:
        if not Path(p).is_dir():
            raise ConfigError(f"--include-path: {p} is not a folder; give the folder that holds the task YAMLs")
    if include_paths:
        local = TaskManager(include_path=include_paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    tm = TaskManager(include_path=include_paths or None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        where = " or under --include-path" if include_paths else ""
        raise ConfigError(f"--tasks: {', '.join(unknown)}: not a task, group or tag of lm-evaluation-harness{where}; "
                          "check the name (`lm_eval ls tasks`), or point --include-path at your task YAML")
    return tm


def evaluate(path: str | Path, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
             include_paths: list[str] = (), batch_size: int = 8, device: str | None = None,
             step: int | None = None, log_samples: bool = False) -> dict:
    """Run the harness; returns its results dict (with "samples" when log_samples) plus "mor": where
    the JSON went and which step was evaluated."""
    _require_harness()
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable, make_table

    from mor_dist.hf.loading import load_hf

    if not tasks:
        raise ConfigError("--tasks: empty; name at least one task, e.g. --tasks hellaswag,piqa")
    if device and not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"--device: {device!r} is not cpu or cuda[:N]; use one of those")
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device: {device} but torch sees no CUDA device; use --device cpu")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    is_run = folder_kind(path) == "run"  # a wrong folder or task fails before anything is written
    tm = task_manager(list(tasks), list(include_paths))
    hf_dir, ckpt_step = model_folder(path, step)
    _check_tokenizer(hf_dir)
    out_dir = Path(path)
    # The model object from this package's classes: the harness never imports code from the folder.
    model, tokenizer = load_hf(hf_dir, device)
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # not its warnings that a model object skips its loading: that is the point
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    finally:
        hf_log.setLevel(level)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=log_samples)
    except AssertionError as e:
        # lm-eval's sanity checks of a request's tokens: a task mistake, not a crash of ours.
        last = traceback.extract_tb(e.__traceback__)[-1]
        if "lm_eval" not in last.filename or "_enc" not in (last.line or ""):
            raise
        raise ConfigError(f"--tasks: a request of {', '.join(tasks)} fails lm-eval's check `{last.line}`: its "
                          "context or continuation encodes to no tokens (or too many) with this model's tokenizer, "
                          "e.g. a choice the tokenizer merges into the prompt's last token; give the task a "
                          "target_delimiter (such as a space) or choices that stand as tokens of their own") from None
    except OSError as e:
        # The model is local: a network error, or a datasets/hub error, is the tasks' data.
        hub = type(e).__module__.split(".")[0] in ("datasets", "huggingface_hub")
        if not (isinstance(e, ConnectionError) or hub):
            raise
        raise ConfigError(f"--tasks: the data of {', '.join(tasks)} could not be loaded ({str(e).splitlines()[0]}); "
                          "without hub access use local task files (docs/evaluation.md)") from None
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))

    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / "eval" / (f"step_{ckpt_step}-{stamp}.json" if ckpt_step is not None else f"{stamp}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    record = {k: results[k] for k in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                                      "higher_is_better", "n-samples", "config") if k in results}
    record["mor"] = {"model": str(path), "hf_folder": str(hf_dir), "step": ckpt_step, "tasks": list(tasks),
                     "limit": limit, "num_fewshot": num_fewshot}
    json_path.write_text(json.dumps(record, indent=2, default=handle_non_serializable) + "\n")
    print(json_path)

    if is_run and ckpt_step is not None:
        _tensorboard(out_dir, results["results"], ckpt_step)
    results["mor"] = {"json": str(json_path), "step": ckpt_step}
    return results


def _tensorboard(run_dir: Path, per_task: dict, step: int) -> None:
    from mor_dist.training.tb_logger import TensorBoardLogger

    scalars = {}
    for task, metrics in per_task.items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if metric in TB_METRICS and isinstance(value, (int, float)):
                scalars[f"eval/{task}/{metric}"] = value
    tb = TensorBoardLogger(run_dir / "tensorboard", True)
    tb.scalars(scalars, step)
    tb.close()
