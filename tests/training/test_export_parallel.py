"""`mor export` of tensor- and pipeline-parallel checkpoints: the merged model computes what the
single-process run's model computes."""

import pytest
import torch

from mor_dist.training.checkpoint import CheckpointError
from tests.training.conftest import run_mor, tiny_overrides

CONFIG = "configs/tiny/mor.yaml"


def _train(dataset, run_dir, nproc=0, port=29651, **extra):
    args = ["train", CONFIG, *tiny_overrides(dataset, run_dir, train__steps=2, checkpoint__interval=2,
                                             train__eval_interval=0, **extra)]
    r = run_mor(args, torchrun=nproc, port=port)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _logits(export_dir, tokens):
    from mor_dist.training.export import load_exported

    model = load_exported(export_dir)
    with torch.no_grad():
        return model(tokens).logits, model.state_dict()


def test_export_merges_tensor_and_pipeline_shards(tiny_dataset, tmp_path):
    from mor_dist.training.export import consolidated_state, export

    _train(tiny_dataset, tmp_path / "one")
    _train(tiny_dataset, tmp_path / "tp", nproc=2, port=29661, parallel__tensor=2)
    _train(tiny_dataset, tmp_path / "pp", nproc=2, port=29662, parallel__pipeline=2)

    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    export(tmp_path / "one", tmp_path / "one_out")
    ref, ref_state = _logits(tmp_path / "one_out", tokens)
    for name in ("tp", "pp"):
        export(tmp_path / name, tmp_path / f"{name}_out")  # checks keys and shapes against build_model
        logits, state = _logits(tmp_path / f"{name}_out", tokens)
        # TP/PP training matches one process to ~1e-5; a misplaced shard would be off by O(1).
        assert (logits - ref).abs().max() < 1e-4, name
        assert int(state["train_step"]) == 2
        assert max((state[k] - ref_state[k]).abs().max() for k in ref_state if k != "train_step") < 1e-4

    # ZeRO-3 with tensor shards is not merged: refused by name, not exported half-done.
    import json

    meta_path = next((tmp_path / "tp" / "checkpoints").glob("step_*")) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["parallel"]["zero_stage"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="zero_stage=3"):
        consolidated_state(tmp_path / "tp")
