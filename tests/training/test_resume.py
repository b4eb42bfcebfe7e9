"""`mor train` end to end: exact resume, DP 2 -> 1 resume, TensorBoard, bad checkpoints, config guard."""

import json
import shutil

import torch

from mor_dist.checkpoint.safe_load import safe_load
from tests.training.conftest import run_mor, tb_events, tb_scalars, tiny_overrides

CONFIG = "configs/tiny/mor.yaml"


def _interrupt_after(src, dst, step):
    """The run folder as an interrupted run leaves it: checkpoints up to `step`, nothing after."""
    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    for p in ckpts.glob("step_*"):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(f"step_{step:08d}")
    shutil.rmtree(dst / "tensorboard")


def _model_states(run_dir, step):
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return safe_load(path)["module"]


def test_exact_resume_tensorboard_and_bad_checkpoints(tiny_dataset, tmp_path):
    full = tmp_path / "full"
    r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, full, train__steps=6)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "TensorBoard: tensorboard --logdir" in r.stdout

    scalars = tb_scalars(full)
    losses = scalars["train/loss"]
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for tag in ("train/lm_loss", "train/lr", "train/grad_norm", "train/param_norm", "train/router_bce/r2",
                "train_system/tokens_per_s", "train_system/step_time_s", "train_system/mfu",
                "train_system/cpu_rss_gib", "train_system/data_wait_s", "train_routing/dead_tokens/r2",
                "train_routing/causal_agreement/r2", "val/loss", "val/ppl", "val/loss_topk", "val/routing_gap"):
        assert tag in scalars, (tag, sorted(scalars))
    # Expert-choice active fractions are the capacity by construction: not plotted (train_routing/depth is).
    assert not any("active_frac" in tag for tag in scalars)
    assert set(scalars["val/loss"]) == {3, 6}
    assert scalars["train/loss_vs_tokens"][6 * 8 * 32] == losses[6]  # x axis: tokens seen

    acc = tb_events(full)
    assert "val/depth_map" in acc.Tags()["images"]
    assert {"train_routing/depth", "val/depth_causal", "val/depth_topk", "val/depths"} <= set(acc.Tags()["tensors"])

    # Interrupted after step 3, resumed with the same command: the same losses bit for bit.
    resumed = tmp_path / "resumed"
    _interrupt_after(full, resumed, 3)
    r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, resumed, train__steps=6)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout
    meta = json.loads((resumed / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["config"]["model"]["vocab_size"] == 512 and meta["step"] == 3 and meta["loader"]["position"] == 24
    again = tb_scalars(resumed)["train/loss"]
    assert sorted(again) == [4, 5, 6]
    assert [again[s] for s in (4, 5, 6)] == [losses[s] for s in (4, 5, 6)]
    a, b = _model_states(full, 6), _model_states(resumed, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Export: one safetensors file + config that rebuilds exactly the checkpointed model.
    r = run_mor(["export", str(full), "-o", str(tmp_path / "export")])
    assert r.returncode == 0, r.stderr[-2000:]
    from mor_dist.training.export import load_exported

    exported = load_exported(tmp_path / "export").state_dict()
    assert int(exported["train_step"]) == 6
    assert all(torch.equal(exported[k], a[k]) for k in a if k in exported) and set(a) <= set(exported)

    # A missing shard file is reported by name, and nothing is written.
    broken = tmp_path / "broken"
    _interrupt_after(full, broken, 3)
    victim = next((broken / "checkpoints" / "step_00000003").glob("*optim_states.pt"))
    victim.unlink()
    r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, broken, train__steps=6)])
    assert r.returncode == 2 and victim.name in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in (broken / "checkpoints").glob("step_*")) == ["step_00000003"]
    assert (broken / "checkpoints" / "latest").read_text() == "step_00000003"

    # A run folder holding another config is refused; its config stays as it was.
    saved = (full / "config.yaml").read_text()
    r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, full, train__steps=6), "model.d_model=64"])
    assert r.returncode == 2 and "model.d_model" in r.stderr and "--force" in r.stderr, r.stderr[-2000:]
    assert (full / "config.yaml").read_text() == saved


def test_resume_at_smaller_data_parallel_size(tiny_dataset, tmp_path):
    dp2 = tmp_path / "dp2"
    # Saved in the background (checkpoint.async_save): two ranks agree on each commit from their threads.
    args = tiny_overrides(tiny_dataset, dp2, train__steps=6, parallel__zero_stage=2, train__eval_interval=0,
                          checkpoint__async_save="true")
    r = run_mor(["train", CONFIG, *args], torchrun=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "writing it in the background" in r.stdout
    assert (dp2 / "checkpoints" / "latest").read_text() == "step_00000006"
    losses = tb_scalars(dp2)["train/loss"]
    # Each rank holds half of the ZeRO-2 optimizer state.
    step3 = dp2 / "checkpoints" / "step_00000003"
    assert len(list(step3.glob("*optim_states.pt"))) == 2

    dp1 = tmp_path / "dp1"
    _interrupt_after(dp2, dp1, 3)
    r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, dp1, train__steps=6, parallel__zero_stage=2,
                                                  train__eval_interval=0)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "converted to a universal checkpoint" in r.stdout
    resumed = tb_scalars(dp1)["train/loss"]
    for s in (4, 5, 6):
        assert abs(resumed[s] - losses[s]) < 1e-5, (s, resumed[s], losses[s])


def test_pipeline_and_tensor_parallel_runs_match_one_process(tiny_dataset, tmp_path):
    """`mor train` drives the parallel train modules: PP=2 (with a resume), TP=2 and TP=2 with sequence
    parallelism give the losses of one process."""

    def losses(run_dir, ranks=0, port=29652, **parallel):
        args = tiny_overrides(tiny_dataset, run_dir, train__steps=4, train__eval_interval=0,
                              checkpoint__interval=2, **parallel)
        r = run_mor(["train", CONFIG, *args], torchrun=ranks, port=port)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return tb_scalars(run_dir)["train/loss"], r.stdout

    want, _ = losses(tmp_path / "single")
    got, _ = losses(tmp_path / "pp", 2, 29652, parallel__pipeline=2)
    assert all(abs(got[s] - want[s]) < 1e-5 for s in want), (got, want)

    _interrupt_after(tmp_path / "pp", tmp_path / "pp_resumed", 2)
    again, out = losses(tmp_path / "pp_resumed", 2, 29653, parallel__pipeline=2)
    assert "resumed from" in out
    assert [again[s] for s in (3, 4)] == [got[s] for s in (3, 4)]

    tp, _ = losses(tmp_path / "tp", 2, 29654, parallel__tensor=2)
    assert all(abs(tp[s] - want[s]) < 1e-5 for s in want), (tp, want)

    # The TP=2 run resumed on one process: converted once (parameters, Adam moments, steps), then the
    # steps of an uninterrupted run.
    _interrupt_after(tmp_path / "tp", tmp_path / "tp_to_1", 2)
    moved, out = losses(tmp_path / "tp_to_1")
    assert "converted step_00000002" in out and "tensor 2 x pipeline 1 x data 1" in out, out[-2000:]
    assert (tmp_path / "tp_to_1" / "universal" / "step_00000002" / "done.json").is_file()
    assert all(abs(moved[s] - want[s]) < 1e-5 for s in (3, 4)), (moved, want)
    sp, _ = losses(tmp_path / "sp", 2, 29655, parallel__tensor=2, parallel__sequence_parallel="true")
    assert all(abs(sp[s] - want[s]) < 1e-5 for s in want), (sp, want)


def test_resume_in_another_precision_goes_through_the_universal_copy(tiny_dataset, tmp_path):
    # train.dtype=auto is fp32 on a CPU and bf16 on a GPU: the same config moved between them changes
    # the optimizer's files (bf16_zero_*), which loading straight failed on with a traceback.
    run = tmp_path / "run"
    args = tiny_overrides(tiny_dataset, run, train__steps=2, train__eval_interval=0)
    r = run_mor(["train", CONFIG, *args])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for steps, dtype, files in ((4, "bf16", "bf16_zero_pp_rank_0_*"), (6, "fp32", "zero_pp_rank_0_*")):
        r = run_mor(["train", CONFIG, *tiny_overrides(tiny_dataset, run, train__steps=steps, train__eval_interval=0,
                                                      train__dtype=dtype), "--force"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "converted to a universal checkpoint" in r.stdout
        assert list((run / "checkpoints" / f"step_{steps:08d}").glob(files + "optim_states.pt"))
        assert json.loads((run / "checkpoints" / f"step_{steps:08d}" / "meta.json").read_text())["bf16"] == (
            dtype == "bf16")


def test_dry_run_picks_and_checks_the_checkpoint_a_start_would(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(tiny_dataset, run, train__steps=4, train__eval_interval=0)
    r = run_mor(["train", CONFIG, *args])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # A --force that changes the model's shape: a start refuses it, so does the dry run (it said "resumes").
    r = run_mor(["train", CONFIG, *args, "model.d_ff=96", "--force", "--dry-run"])
    assert r.returncode == 2 and "--force cannot change the model's shape" in r.stderr, r.stdout + r.stderr
    # A truncated file in the latest checkpoint: the dry run names the one a start falls back to.
    shard = run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    r = run_mor(["train", CONFIG, *args, "--dry-run"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumes from checkpoints/step_00000003" in r.stdout and "mp_rank_00_model_states.pt" in r.stdout
