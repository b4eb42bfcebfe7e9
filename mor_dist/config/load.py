"""Load a config: YAML file (with `base:` inheritance) + dotlist overrides -> validated MoRConfig.

Errors name the file and the key, and nothing starts before the whole tree is valid.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mor_dist.config.schema import MoRConfig
from mor_dist.config.validate import ConfigError, validate


def _read_yaml(path: Path, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """The file and its `base:` ancestors, most basic first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config groups, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    chain = []
    for b in [bases] if isinstance(bases, str) else bases:
        chain += _read_yaml(path.parent / b, seen + (path,))
    return chain + [(path, data)]


def _merge(cfg: DictConfig, data, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {msg}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Returns the typed OmegaConf tree (attribute access, still a structured MoRConfig)."""
    cfg = OmegaConf.structured(MoRConfig)
    if path is not None:
        for p, data in _read_yaml(Path(path)):
            cfg = _merge(cfg, data, str(p))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like group.key=value (e.g. model.recursions=3)")
            try:
                dot = OmegaConf.from_dotlist([item])
            except OmegaConfBaseException as e:
                raise ConfigError(f"override {item!r}: {e}") from None
            cfg = _merge(cfg, dot, f"override {item!r}")
    validate(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
