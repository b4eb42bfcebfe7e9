"""What a resume may change, without training: the layout rules of training/reshard.py on checkpoint
folders made of their names alone (the rules read meta.json and the names of the optimizer files)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mor_dist.checkpoint import CheckpointError
from mor_dist.config import load_config
from mor_dist.training.reshard import check_resume_fits, layout_changed, saved_layout

TINY = "configs/tiny/mor.yaml"


def folder(tmp_path, *files):
    f = tmp_path / "checkpoints" / "step_00000002"
    f.mkdir(parents=True)
    for name in files:
        (f / name).write_bytes(b"")
    return f


def meta(zero: int, bf16=None, dp: int = 1, pipeline: int = 1) -> dict:
    m = {"world_size": dp * pipeline, "data_parallel_size": dp,
         "config": {"parallel": {"tensor": 1, "pipeline": pipeline, "zero_stage": zero}}}
    if bf16 is not None:
        m["bf16"] = bf16
    return m


def fits(f, m, *overrides, dp=1):
    cfg = load_config(TINY, list(overrides))
    check_resume_fits(f, m, cfg, SimpleNamespace(tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline, dp=dp, rank=0))


def test_precision_from_meta_or_the_optimizer_files(tmp_path):
    assert saved_layout(meta(1, True))["bf16"] is True
    assert saved_layout(meta(1), folder(tmp_path, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"))["bf16"] is True
    assert saved_layout(meta(1), folder(tmp_path / "b", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))["bf16"] is False
    assert saved_layout(meta(0), folder(tmp_path / "c", "mp_rank_00_model_states.pt"))["bf16"] is None  # not told


def test_precision_counts_only_where_it_names_the_optimizer_files():
    fp32_z1, bf16_z1 = saved_layout(meta(1, False)), saved_layout(meta(1, True))
    assert layout_changed(fp32_z1, bf16_z1) and not layout_changed(bf16_z1, bf16_z1)
    # Plain torch optimizers on both sides (ZeRO-0, no pipeline): weights and moments load as they are.
    assert not layout_changed(saved_layout(meta(0, False)), saved_layout(meta(0, True)))
    # An older checkpoint that does not say: taken as unchanged.
    assert not layout_changed(saved_layout(meta(0)), saved_layout(meta(0, True)))
    assert layout_changed(saved_layout(meta(0, False)), saved_layout(meta(0, False, dp=2)))


def test_an_older_zero0_checkpoint_resumes_in_its_layout_whatever_the_precision(tmp_path):
    # Saved in bf16 at ZeRO-0 before meta.json recorded the precision: no optimizer files tell it.
    f = folder(tmp_path, "mp_rank_00_model_states.pt")
    fits(f, meta(0), "parallel.zero_stage=0", "train.dtype=bf16")
    fits(f, meta(0), "parallel.zero_stage=0", "train.dtype=fp32")
    with pytest.raises(CheckpointError, match="by a plain torch optimizer.*train.dtype"):
        fits(f, meta(0), "parallel.zero_stage=0", dp=2)


def test_a_plain_torch_optimizer_never_takes_a_universal_checkpoint(tmp_path):
    # bf16 without a pipeline at ZeRO-0 is torch's AdamW too (DeepSpeed's bf16 optimizer is the pipeline's).
    f = folder(tmp_path, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="parallel.zero_stage: 0 \\(a plain torch optimizer\\)"):
        fits(f, meta(1, False), "parallel.zero_stage=0", "train.dtype=bf16")
    fits(f, meta(1, False), "parallel.zero_stage=1", "train.dtype=fp32")  # the same layout: straight
