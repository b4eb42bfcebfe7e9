"""bf16 training in every layout (DeepSpeed's bf16: bf16 weights and activations, fp32 master
weights, gradients accumulated in fp32 under ZeRO) against the fp32 single process: the same
learning curve within a stated tolerance -- 1% of the loss over 5 steps (measured: <= 0.6%)."""

from __future__ import annotations

import pytest

from tests.parallel.common import config, reference_losses
from tests.parallel.conftest import BF16_CASES


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: "-".join(c))
def test_bf16_layout_tracks_fp32(world2, case):
    ref = reference_losses(config("mor"))
    for r in world2:
        got = r["bf16_cases"][case]
        assert got["dtype"] == "torch.bfloat16"
        assert got["losses"] == pytest.approx(ref, rel=0.01)
        assert got["losses"] != pytest.approx(ref, abs=1e-6)  # really ran in bf16


def test_bf16_without_zero_warns_that_gradients_accumulate_in_bf16(caplog):
    """DeepSpeed keeps fp32 gradient accumulation for ZeRO only: stage 0 under bf16 says so."""
    from mor_dist.parallel.dims import ParallelDims
    from mor_dist.parallel.engine import deepspeed_config

    dims = ParallelDims(world=1, rank=0, tp=1, pp=1)
    accumulating = ["train.dtype=bf16", "train.global_batch_size=8", "train.micro_batch_size=2"]
    with caplog.at_level("WARNING", logger="mor.train"):
        ds = deepspeed_config(config("mor", [*accumulating, "parallel.zero_stage=1"]), dims)
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and not caplog.records
        ds = deepspeed_config(config("mor", [*accumulating, "parallel.zero_stage=0"]), dims)
    assert "data_types" not in ds
    assert [r.getMessage() for r in caplog.records] == [
        "parallel.zero_stage=0 under bf16: gradients accumulate in bf16 over 4 micro-batches (DeepSpeed keeps "
        "fp32 accumulation for ZeRO only); zero_stage=1 keeps them in fp32"]
