"""Hugging Face loading runs offline here: no test may reach the hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.training.conftest import run_mor, tiny_dataset, tiny_overrides  # noqa: E402,F401


RUN_TOKENS = 1300  # 5 whole steps of 256 tokens


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dataset) -> Path:  # noqa: F811
    """A real run folder: tiny MoR (expert-choice) trained by `mor train` for a budget of RUN_TOKENS
    (5 steps of 8 x 32 tokens), one checkpoint. Kept in the session's base temp folder, so the
    other test folders that import this fixture reuse it."""
    run = tmp_path_factory.getbasetemp() / "hf_trained_run"
    if not (run / "checkpoints" / "latest").exists():
        r = run_mor(["train", "configs/tiny/mor.yaml",
                     *tiny_overrides(tiny_dataset, run, train__tokens=RUN_TOKENS, train__eval_interval=0,
                                     schedule__warmup_fraction=0.4, schedule__decay_fraction=0.4,
                                     checkpoint__interval=10)])
        assert r.returncode == 0, r.stderr[-3000:]
    return run
