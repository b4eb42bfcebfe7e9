"""config.yaml of a run folder, and the refusal to mix two different runs in one folder.

The file is written only once a start has built the model and the data and loaded its checkpoint
(write_config, called by the trainer's entry point): a start that fails leaves it as it was.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from mor_dist.run_folder.files import replacing

CONFIG_FILE = "config.yaml"

# Keys a resumed run may change: how long, how it is laid out, how it reports. Everything else
# (model, routing, data, optimizer...) changes the run's meaning.
MUTABLE_PREFIXES = (
    "train.steps", "train.flops_budget", "train.tokens", "train.eval_interval", "train.eval_batches",
    "train.nan_policy", "train.device", "train.compile",
    "parallel.", "logging.", "checkpoint.", "data.num_workers", "data.prefetch_factor", "data.pin_memory",
    "data.verify", "data.skip_corrupt", "data.read_ahead", "data.fetch_retries", "data.fetch_backoff_s",
    # How `mor data prepare` built the dataset: training reads the dataset itself.
    "data.inputs", "data.text_field", "data.vocab_size", "data.tokenizer_train_bytes", "data.val_fraction",
    "data.shard_samples", "data.prepare_workers",
)


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked; the message starts with the folder or file."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ. A key the saved config lacks (written before the key existed)
    counts as its default, so upgrading mor_dist does not lock a run out of its folder."""
    from mor_dist.config.schema import MoRConfig

    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(MoRConfig), resolve=True))
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(MUTABLE_PREFIXES):
            continue
        old = a[key] if key in a else defaults.get(key)
        if old != b.get(key):
            diffs.append(f"{key}: {old!r} in the run folder, {b.get(key)!r} now")
    return diffs


def saved_config(run_dir: Path) -> dict | None:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user-facing problem
        raise RunDirError(f"{path}: unreadable ({str(e).splitlines()[0]}); restore it, or use another "
                          "logging.run_dir") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a config mapping; restore it, or use another logging.run_dir")
    return data


def check_config(cfg, force: bool) -> list[str]:
    """The differences between the folder's config.yaml and cfg (none for a new folder); refused
    unless `force`. Reads only."""
    run_dir = Path(cfg.logging.run_dir)
    saved = saved_config(run_dir)
    if saved is None:
        return []
    diffs = config_differences(saved, OmegaConf.to_container(cfg, resolve=True))
    if diffs and not force:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise RunDirError(
            f"{run_dir / CONFIG_FILE}: holds a run with a different config ({shown}); use another "
            "logging.run_dir, or pass --force to continue this run with the new config"
        )
    return diffs


def write_config(cfg, replaced_differences: list[str]) -> None:
    """Write config.yaml (atomically); a forced change keeps the previous file beside it."""
    from mor_dist.config import to_yaml

    run_dir = Path(cfg.logging.run_dir)
    path = run_dir / CONFIG_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    if replaced_differences and path.is_file():
        keep = run_dir / f"{CONFIG_FILE}.before-force-{time.strftime('%Y%m%d-%H%M%S')}"
        keep.write_text(path.read_text())
    with replacing(path) as tmp:
        tmp.write_text(to_yaml(cfg))
