"""The run folder: its config, and the refusal to mix two different runs in one folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from mor_dist.config import to_yaml

CONFIG_FILE = "config.yaml"

# Keys a resumed run may change: how long, how it is laid out, how it reports. Everything else
# (model, routing, data, optimizer...) changes the run's meaning.
MUTABLE_PREFIXES = (
    "train.steps", "train.eval_interval", "train.eval_batches", "train.nan_policy", "train.device",
    "parallel.", "logging.", "checkpoint.", "data.num_workers", "data.prefetch_factor", "data.pin_memory",
    "data.verify", "data.skip_corrupt",
)


class RunDirError(RuntimeError):
    pass


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
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(MUTABLE_PREFIXES):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} in the run folder, {b.get(key)!r} now")
    return diffs


def prepare_run_dir(cfg, force: bool) -> Path:
    """Create the run folder or check that it belongs to this config; write config.yaml (rank 0)."""
    run_dir = Path(cfg.logging.run_dir)
    saved_path = run_dir / CONFIG_FILE
    current = OmegaConf.to_container(cfg, resolve=True)
    if saved_path.is_file():
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
        diffs = config_differences(saved, current)
        if diffs and not force:
            raise RunDirError(
                f"{run_dir} holds a run with a different config ({saved_path}):\n  " + "\n  ".join(diffs)
                + "\nUse another logging.run_dir, or pass --force to continue this run with the new config."
            )
        if diffs:
            (run_dir / f"{CONFIG_FILE}.before-force").write_text(saved_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(to_yaml(cfg))
    return run_dir
