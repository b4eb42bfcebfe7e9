"""Load a config: YAML file (with `base:` inheritance) + dotlist overrides -> validated MoRConfig.

Errors name the file (with the line where YAML knows it) or the key, and nothing starts before the
whole tree is valid.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mor_dist.config.budget import apply_budget
from mor_dist.config.schema import MoRConfig
from mor_dist.config.validate import ConfigError, validate


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys without a word; a config that sets a key twice
    is ambiguous, so it is refused with both lines."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden, by design
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first.get(key)
            except TypeError:  # unhashable: SafeLoader's own error says so
                continue
            if seen is not None:
                raise _DuplicateKeyError(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first set on line {seen}); keep one")
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error (PyYAML's own text spans several, with a caret drawing)."""
    if isinstance(e, yaml.reader.ReaderError):
        return f"not a YAML text file (character #x{e.character:04x} at position {e.position}); give a YAML config"
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return "not valid YAML: " + " ".join(str(e).split())
    problem = getattr(e, "problem", None) or "syntax error"
    ctx = getattr(e, "context", None)
    if ctx and getattr(e, "context_mark", None) is not None:
        problem += f" ({ctx} from line {e.context_mark.line + 1})"
    return f"line {mark.line + 1}: not valid YAML: {problem}; fix the syntax there"


def _read_yaml(path: Path, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """The file and its `base:` ancestors, most basic first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to this file; remove the cycle")
    if not path.is_file():
        what = "is a directory, not a config file" if path.is_dir() else "config file not found"
        raise ConfigError(f"{path}: {what}; check " + (f"`base:` in {seen[-1]}" if seen else "the path"))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (no UTF-8 at byte {e.start}); give a YAML config") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except _DuplicateKeyError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: top level is a {type(data).__name__}; a config is a mapping of groups (model:, train:, ...)")
    bases = data.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: {bases!r} is not a file name; write e.g. `base: base.yaml` (or a list)")
    chain = []
    for b in bases:
        chain += _read_yaml(path.parent / b, seen + (path,))
    return chain + [(path, data)]


def _key_problem(cfg: DictConfig, key: str) -> str:
    """'no such key', with the nearest keys of its group as a suggestion."""
    group, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, group) if group else cfg
    if not OmegaConf.is_dict(node):  # the group itself is unknown: its own name is the mistake
        return "no such key"
    known = [str(k) for k in node.keys()]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {group + '.' if group else ''}{close[0]}?" if close else f"keys here: {', '.join(known)}"
    return f"no such key; {hint}"


def _merge(cfg: DictConfig, data, file: Path | None = None, override: str | None = None) -> DictConfig:
    """Merges a file's data or one override; errors name the file and key, or the key and override."""

    def error(key, problem: str) -> ConfigError:
        if file is not None:
            return ConfigError(f"{file}: {key}: {problem}")
        return ConfigError(f"{key}: {problem} (in override {override!r})")

    for group, value in data.items():  # `model: 3` would otherwise give OmegaConf's keyless merge error
        if isinstance(group, str) and OmegaConf.is_dict(cfg.get(group)) and not isinstance(value, (dict, DictConfig)):
            raise error(group, f"expected a mapping of {group} keys, got {value!r}")
    try:
        return OmegaConf.merge(cfg, data)
    except TypeError as e:  # a dotted key into a list (data.sources.0.dir=...): OmegaConf's bare TypeError
        key = override.split("=", 1)[0] if override else "?"
        parts = key.split(".")
        whole = ".".join(parts[:next((i for i, x in enumerate(parts) if x.isdigit()), len(parts))])
        example = "[{dir: A, weight: 0.7}, {dir: B, weight: 0.3}]" if whole == "data.sources" else "[...]"
        raise error(key, f"cannot set part of a list that way ({e}); give {whole} whole, e.g. "
                         f"'{whole}={example}'") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        problem = _key_problem(cfg, key) if isinstance(e, ConfigKeyError) else _type_problem(str(e).splitlines()[0])
        raise error(key, problem) from None


_KINDS = {"Integer": ("a whole number", "e.g. 1000 (1e3 reads as a float)"), "Float": ("a number", "e.g. 3e-4"),
          "Boolean": ("true or false", "true or false"), "String": ("text", "a quoted string")}


def _type_problem(message: str) -> str:
    """OmegaConf's type complaints, said with what to give instead."""
    m = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", message)
    if m:
        kind, example = _KINDS.get(m.group(2), (m.group(2), m.group(2)))
        return f"{m.group(1)!r} is not {kind}; give {example}"
    m = re.match(r"Incompatible value '(None)' for field of type '(\w+)'", message)
    if m:
        return f"needs a value (of type {m.group(2)}), it cannot be empty; give one or leave the key out"
    return message


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Returns the typed OmegaConf tree (attribute access, still a structured MoRConfig)."""
    cfg = OmegaConf.structured(MoRConfig)
    if path is not None:
        for p, data in _read_yaml(Path(path)):
            cfg = _merge(cfg, data, file=p)
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"{item}: an override must look like group.key=value (e.g. model.recursions=3)")
        try:
            dot = OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as e:  # the value is parsed as YAML
            raise ConfigError(f"{item.split('=')[0]}: {str(e).splitlines()[0]} (in override {item!r})") from None
        cfg = _merge(cfg, dot, override=item)
    try:
        OmegaConf.resolve(cfg)  # ${...} interpolations: a bad one fails here, naming its key
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', None) or '?'}: {str(e).splitlines()[0]}") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, False)
    budget = "train.flops_budget" if cfg.train.flops_budget is not None else \
        "train.tokens" if cfg.train.tokens is not None else None
    if budget and any(item.split("=", 1)[0].strip() == "train.steps" for item in overrides or []):
        # The budget would replace it without a word.
        raise ConfigError(f"train.steps: given, but {budget} is set too and decides the steps; give one of them "
                          f"({budget}=null to run train.steps)")
    apply_budget(cfg)  # train.flops_budget / train.tokens -> train.steps
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
