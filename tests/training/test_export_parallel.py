"""`mor export` of tensor- and pipeline-parallel checkpoints: the merged model computes what the
single-process run's model computes."""

import torch

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

    # The TP=2 run resumed in one process: converted through its universal copy, the checkpoint
    # itself left as it was.
    ckpts = tmp_path / "tp" / "checkpoints" / "step_00000002"
    before = sorted((p.relative_to(ckpts), p.stat().st_size) for p in ckpts.rglob("*") if p.is_file())
    r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, tmp_path / "tp", train__steps=4,
                                                  checkpoint__interval=2, train__eval_interval=0)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "converted step_00000002" in r.stdout, r.stdout[-2000:]
    assert sorted((p.relative_to(ckpts), p.stat().st_size) for p in ckpts.rglob("*") if p.is_file()) == before

    # checkpoint.init_from: the TP=2 export starts a one-process run from the trained weights. Its first
    # step sees the batch the fresh run "one" started on, with trained weights: a lower loss.
    from tests.training.conftest import tb_scalars

    warm_args = tiny_overrides(tiny_dataset, tmp_path / "warm", train__steps=1, checkpoint__interval=1,
                               train__eval_interval=0, checkpoint__init_from=str(tmp_path / "tp_out"))
    r = run_mor(["train", CONFIG, *warm_args])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "initial weights from" in r.stdout
    warm, fresh = tb_scalars(tmp_path / "warm")["train/loss"], tb_scalars(tmp_path / "one")["train/loss"]
    assert warm[1] < fresh[1] - 0.1, (warm, fresh)  # about 5.55 vs 6.25 here
    r = run_mor(["train", CONFIG, *warm_args[:-1], f"checkpoint.init_from={tmp_path / 'missing'}",
                 "logging.run_dir=" + str(tmp_path / "cold")])
    assert r.returncode == 2 and "missing/model.safetensors is missing" in r.stderr, r.stderr[-2000:]

    # ZeRO-3 with tensor parallelism (each tensor shard also scattered over data-parallel ranks):
    # exported through the universal copy, the same model.
    _train(tiny_dataset, tmp_path / "tp_z3", nproc=2, port=29663, parallel__tensor=2, parallel__zero_stage=3)
    export(tmp_path / "tp_z3", tmp_path / "tp_z3_out")
    logits, state = _logits(tmp_path / "tp_z3_out", tokens)
    assert (logits - ref).abs().max() < 1e-4
    assert int(state["train_step"]) == 2
