"""Resuming at another layout, inside spawned ranks: a run saves at one layout (through the
CheckpointManager, with the meta.json the trainer writes), the next loads at another exactly as
`mor train` does (check_resume_fits -> universal_source -> build with load_universal -> load).

Every rank returns, per case: the losses of the resumed steps, those of an uninterrupted run at the
new layout (same initial weights, same batches), and whether each parameter, Adam moment, step count
and buffer it holds after the load equals the saved run's (gathered over its layout) bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from tests.parallel.common import config, model_for, rank_share, step_batches

SAVE_AT = 2  # steps before the first checkpoint
MORE = 2  # steps at each next layout before its checkpoint


def _dims(cfg):
    from mor_dist.parallel.dims import init_distributed

    return init_distributed(cfg.parallel)


def _build(cfg, dims, load_universal=False):
    from mor_dist.parallel.train_module import build_train_module

    return build_train_module(model_for(cfg), cfg, dims, load_universal=load_universal)


def _train(module, cfg, dims, steps: range) -> list[float]:
    return [module.train_step(rank_share(step_batches(cfg, s), dims.dp, dims.dp_rank), cfg.optim.lr)["loss"]
            for s in steps]


def _meta(cfg, dims) -> dict:
    """What Trainer.save records (no data loader here: the batches are a function of the step)."""
    return {"tokens_seen": 0, "skipped_steps": 0, "loader": {}, "data_parallel_size": dims.dp, "reshardable": True,
            "config": OmegaConf.to_container(cfg, resolve=True)}


def _link_moments(module) -> None:
    """DeepSpeed's ZeRO-1/2 getters find Adam's moments through links it makes once, after the first
    group's first step: the second group's moments (norms, routers) exist only from its own step on.
    Link again, now that every group has stepped."""
    opt = module.engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _gathered(module, dims) -> dict:
    """{model name: {"fp32", "exp_avg", "exp_avg_sq"} full tensors} plus "step" counts and "buffers",
    the same on every rank: ZeRO partitions through DeepSpeed's own getters, tensor shards
    concatenated, pipeline stages merged."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from mor_dist.checkpoint.deepspeed_io import model_names, model_of, split_dim

    _link_moments(module)
    names = model_names(module.engine)
    tp_group = None
    if dims.tp > 1:
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
    local = {}
    for p in module.engine.module.parameters():
        got = {"fp32": safe_get_full_fp32_param(p)}
        for key in ("exp_avg", "exp_avg_sq"):
            got[key] = safe_get_full_optimizer_state(p, key)
        if split_dim(p) is not None:
            for key, t in got.items():
                parts = [torch.empty_like(t) for _ in range(dims.tp)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                got[key] = torch.cat(parts, dim=split_dim(p))
        local[names[p]] = {k: v.detach().clone() for k, v in got.items()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    merged = {}
    for d in everyone:
        merged.update(d)
    merged["step"] = _steps(module)
    merged["buffers"] = {n: b.clone() for n, b in model_of(module.engine).named_buffers()}
    return merged


def _steps(module) -> list[float]:
    """Adam's step count of every optimizer state this rank holds."""
    opt = module.engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    return sorted({float(s["step"]) for s in inner.state.values() if "step" in s})


def _matches(module, dims, saved: dict) -> dict:
    """Per parameter this rank holds after a load: equal (torch.equal) to the saved run's state?"""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from mor_dist.checkpoint.deepspeed_io import model_names, model_of, split_dim

    names = model_names(module.engine)
    out = {}
    for p in module.engine.module.parameters():
        name = names[p]
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            got = safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)
            want = saved[name][key]
            if split_dim(p) is not None:
                want = want.chunk(dims.tp, dim=split_dim(p))[dims.tp_rank]
            out[f"{name}/{key}"] = bool(torch.equal(got, want))
    out["step"] = _steps(module) == saved["step"] and len(saved["step"]) == 1
    for n, b in model_of(module.engine).named_buffers():
        out[f"buffer {n}"] = bool(torch.equal(b, saved["buffers"][n]))
    return out


def reshard_chains(chains, folder):
    """Per chain (model config, [layout 0, layout 1, ...]): train SAVE_AT steps at layout 0 and save;
    then at each next layout load the last save the way `mor train` does, check the state against the
    saved run's, train MORE steps and save. Per hop: the resumed losses, an uninterrupted run's at that
    layout (same initial weights and batches) over the same steps, the state checks, and whether the
    checkpoint went through a universal conversion."""
    from mor_dist.checkpoint import CheckpointManager
    from mor_dist.training.reshard import check_resume_fits, universal_source

    results = {}
    for i, (name, layouts) in enumerate(chains):
        ckpt = CheckpointManager(Path(folder) / f"chain{i}")
        cfg = config(name, list(layouts[0]))
        dims = _dims(cfg)
        module = _build(cfg, dims)
        _train(module, cfg, dims, range(SAVE_AT))
        step = SAVE_AT
        for k, layout in enumerate(layouts[1:], 1):
            ckpt.save(step, _meta(cfg, dims), module.save)
            saved = _gathered(module, dims)
            del module
            cfg = config(name, list(layout))
            dims = _dims(cfg)
            reference = _train(_build(cfg, dims), cfg, dims, range(step + MORE))[step:]
            where, meta, _ = ckpt.resolve_resume()
            check_resume_fits(where, meta, cfg, dims)
            universal = universal_source(where, meta, cfg, dims)
            module = _build(cfg, dims, load_universal=universal is not None)
            module.load(universal or where)
            matches = _matches(module, dims, saved)
            resumed = _train(module, cfg, dims, range(step, step + MORE))
            results[(name, k)] = {"layouts": (layouts[k - 1], layout), "resumed": resumed, "reference": reference,
                                  "matches": matches, "converted": universal is not None}
            step += MORE
    return results
