import dataclasses
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mor_dist.config import RANGES, ConfigError, MoRConfig, load_config, validate
from mor_dist.config.validate import in_range

TINY = "configs/tiny/mor.yaml"


def test_tiny_loads_with_overrides():
    cfg = load_config(TINY, ["model.recursions=2", "routing.alpha=0.2"])
    assert cfg.model.recursions == 2 and cfg.routing.alpha == 0.2
    assert cfg.routing.type == "expert"  # from the file
    assert cfg.model.d_model == 128  # from its base


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.no_such_key=1"], "model.no_such_key"),
        (["model.d_model=wide"], "model.d_model"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["model.recursions=4"], "model.recursions"),  # 6 middle layers, 4 recursions, no padding
        (["routing.capacity=[1.0,0.5,1.5]"], "routing.capacity[2]"),
        (["routing.capacity=[1.0,0.0,0.0]"], "routing.capacity[1]"),
        (["routing.capacity=[0.5,1.0,0.5]"], "routing.capacity[1]"),
        (["routing.type=expertise"], "routing.type"),
        (["kv.strategy=share", "model.sharing=middle_sequence"], "model.sharing"),
        (["parallel.pipeline=2", "parallel.zero_stage=2"], "parallel.zero_stage"),
        (["data.seq_len=4096"], "data.seq_len"),
        (["parallel.pipeline=2", "train.nan_policy=skip"], "train.nan_policy"),
        (["model.recursions"], "model.recursions"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(TINY, overrides)


def test_padding_option_allows_non_divisible(tmp_path):
    cfg = load_config(TINY, ["model.recursions=4", "model.pad_layers=true"])
    from mor_dist.model import make_layout

    lay = make_layout(cfg.model.n_layers, 4, cfg.model.sharing, True)
    assert (lay.prefix, lay.block, lay.suffix, lay.effective_depth) == (1, 2, 1, 10)


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle:\n  d_model: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*modle"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def _numeric_keys(cls, prefix=""):
    """Dotted names of every int/float (or list/optional of them) field of a config dataclass."""
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            yield from _numeric_keys(hint, f"{prefix}{name}.")
        elif {int, float} & set(_leaf_types(hint)):
            yield prefix + name


def _leaf_types(hint):
    args = typing.get_args(hint)
    return [t for a in args for t in _leaf_types(a)] if args else [hint]


def test_every_numeric_key_declares_a_range():
    numeric = set(_numeric_keys(MoRConfig))
    assert len(numeric) > 45 and numeric == set(RANGES), numeric ^ set(RANGES)
    validate(OmegaConf.structured(MoRConfig))  # the defaults lie in their ranges


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").rglob("*.yaml")))
def test_every_preset_is_valid(path):
    load_config(path)


def test_docs_list_every_range():
    """docs/training.md's table says what RANGES checks, key by key."""
    text = Path("docs/training.md").read_text()
    for key, spec in RANGES.items():
        assert f"| `{key}` | `{spec}` |" in text, key


@pytest.mark.parametrize("value, spec, inside", [
    (1, ">= 1", True), (0, ">= 1", False), (0.0, "> 0", False), (1e-12, "> 0", True),
    (0, "[0, 1)", True), (1, "[0, 1)", False), (1, "(0, 1]", True), (0, "(0, 1]", False),
    (3, "[0, 3]", True), (4, "[0, 3]", False), (float("nan"), ">= 0", False), (float("inf"), "> 0", False),
    (True, ">= 0", False), ("1", ">= 0", False),
])
def test_in_range(value, spec, inside):
    assert in_range(value, spec) is inside


def test_duplicate_yaml_keys_are_refused_but_merge_keys_may_be_overridden(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  steps: 3\n  seed: 1\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 4: duplicate key 'steps' \(first set on line 2\)"):
        load_config(dup)
    merged = tmp_path / "merged.yaml"
    merged.write_text(f"base: {Path(TINY).resolve()}\nmodel:\n  <<: {{d_ff: 256, n_layers: 8}}\n  d_ff: 320\n")
    assert load_config(merged).model.d_ff == 320


@pytest.mark.parametrize("override, said", [
    ("train.steps=abc", "train.steps: 'abc' is not a whole number; give e.g. 1000"),
    ("train.steps=1e3", "train.steps: '1000.0' is not a whole number; give e.g. 1000 (1e3 reads as a float)"),
    ("optim.lr=fast", "optim.lr: 'fast' is not a number; give e.g. 3e-4"),
    ("logging.run_dir=", "logging.run_dir: needs a value (of type str), it cannot be empty"),
    # A dotted key into a list: OmegaConf raised a bare TypeError (a traceback).
    ("data.sources.0.dir=/x", "data.sources.0.dir: cannot set part of a list that way"),
])
def test_a_value_of_the_wrong_type_says_what_to_give(override, said):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny/mor.yaml", [override])
    assert str(e.value).startswith(said), str(e.value)
