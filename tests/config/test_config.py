import pytest

from mor_dist.config import ConfigError, load_config

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
