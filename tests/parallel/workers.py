"""Functions run inside spawned ranks (importable by the spawn start method)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.parallel.common import config, model_for, rank_share, step_batches, train_losses
from tests.parallel.reshard_workers import reshard_chains  # noqa: F401 - run_all finds workers here by name


def _dims(cfg):
    from mor_dist.parallel.dims import init_distributed

    return init_distributed(cfg.parallel)


def _gather_tp_grads(model, dims, prefix="shared."):
    """Full gradients of the (tensor-parallel) parameters under prefix, gathered over the TP group."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    out = {}
    for name, p in model.named_parameters():
        if not name.startswith(prefix):
            continue
        g = p.grad.detach().clone()
        key = name.replace(".inner", "")
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(dims.tp)]
            dist.all_gather(parts, g, group=group)
            g = torch.cat(parts, dim=p.partition_dim)
        out[key] = g
    return out


def tp_cases(cases):
    """TP=2 (world 2): per case, initial shared-block gradients (gathered), depths, activation bytes
    saved for backward, 5-step losses."""
    from mor_dist.parallel.activation_bytes import SavedActivationBytes
    from mor_dist.parallel.train_module import build_train_module

    results = {}
    for name, overrides in cases:
        cfg = config(name, ["parallel.tensor=2", *overrides])
        dims = _dims(cfg)
        model = model_for(cfg)
        module = build_train_module(model, cfg, dims)
        module.measure_bytes = True
        tokens, targets = step_batches(cfg, 0)[0]
        with SavedActivationBytes(model) as saved:
            out = model(tokens, targets)
        out.loss.backward()
        grads = _gather_tp_grads(model, dims, prefix="")  # every parameter: routers, embedding, unique layers
        model.zero_grad(set_to_none=True)
        ev = module.eval_step(tokens, targets)  # causal routing: padded gathers
        losses = train_losses(module, cfg, dims)
        results[(name, overrides)] = {
            "grads": grads, "depth": out.depth, "losses": losses, "bytes": dict(module.last_rank_bytes),
            "activation_bytes": saved.bytes, "eval": ev,
        }
    return results


def zero_cases(stages, name="mor"):
    """DP=2 (world 2): per ZeRO stage, 5-step losses and the measured per-rank bytes."""
    from mor_dist.parallel.train_module import build_train_module

    results = {}
    for stage in stages:
        cfg = config(name, [f"parallel.zero_stage={stage}"])
        dims = _dims(cfg)
        module = build_train_module(model_for(cfg), cfg, dims)
        module.measure_bytes = True
        losses = train_losses(module, cfg, dims)
        results[stage] = {"losses": losses, "bytes": dict(module.last_rank_bytes)}
    return results


def run_all(jobs):
    """Several groups of cases in one world: [(worker name, args), ...] -> {worker name: result}."""
    import sys

    module = sys.modules[__name__]
    return {name: getattr(module, name)(*args) for name, args in jobs}


def pp_cases(cases):
    """Pipeline layouts: per case, 5-step losses, this rank's stage, its tied weights after training,
    an eval result, and per-rank bytes."""
    from mor_dist.parallel.train_module import build_train_module

    results = {}
    for name, overrides in cases:
        cfg = config(name, list(overrides))
        dims = _dims(cfg)
        module = build_train_module(model_for(cfg), cfg, dims)
        module.measure_bytes = True
        losses = train_losses(module, cfg, dims)
        metrics = module.train_step(rank_share(step_batches(cfg, 5), dims.dp, dims.dp_rank), cfg.optim.lr)
        tied_modules = module.pipe.tied_modules.items() if hasattr(module, "pipe") else ()
        tied = {k: {n: p.detach().clone() for n, p in m.named_parameters()} for k, m in tied_modules}
        tokens, targets = step_batches(cfg, 0)[0]
        ev = module.eval_step(tokens, targets)
        results[(name, overrides)] = {
            "losses": losses, "stage": dims.pp_rank, "tp_rank": dims.tp_rank, "tied": tied, "eval": ev,
            "bytes": dict(module.last_rank_bytes), "metrics": metrics,
        }
    return results


def grad_norm_cases(cases):
    """Per layout: the first step's metrics with per-group gradient norms (detail=True)."""
    from mor_dist.parallel.train_module import build_train_module

    results = {}
    for overrides in cases:
        cfg = config("mor", list(overrides))
        dims = _dims(cfg)
        module = build_train_module(model_for(cfg), cfg, dims)
        metrics = module.train_step(rank_share(step_batches(cfg, 0), dims.dp, dims.dp_rank), cfg.optim.lr, detail=True)
        results[overrides] = {k: v for k, v in metrics.items() if k.startswith("grad_norm")}
    return results


def bf16_cases(cases):
    """Per layout: 5-step losses in bf16 (the layout's overrides + train.dtype=bf16)."""
    from mor_dist.parallel.train_module import build_train_module

    results = {}
    for overrides in cases:
        cfg = config("mor", ["train.dtype=bf16", *overrides])
        dims = _dims(cfg)
        module = build_train_module(model_for(cfg), cfg, dims)
        module.measure_bytes = True
        results[overrides] = {"losses": train_losses(module, cfg, dims),
                              "dtype": str(next(module.engine.module.parameters()).dtype),
                              "bytes": dict(module.last_rank_bytes)}
    return results


def ckpt_cases(cases, folder):
    """Save after 2 steps, take step 3; a fresh module (other init) loads the save and takes step 3:
    the two step-3 losses and the restored step counters must agree."""
    from pathlib import Path

    from mor_dist.parallel.train_module import build_train_module

    results = {}
    for i, overrides in enumerate(cases):
        cfg = config("mor", list(overrides))
        dims = _dims(cfg)
        module = build_train_module(model_for(cfg), cfg, dims)
        train_losses(module, cfg, dims, steps=2)
        where = Path(folder) / f"case{i}" / "step2"
        module.save(where)
        dist.barrier()
        unsafe = sorted({g for f in where.rglob("*.pt") for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(f))})
        after = module.train_step(rank_share(step_batches(cfg, 2), dims.dp, dims.dp_rank), cfg.optim.lr)["loss"]
        torch.manual_seed(99)
        fresh_model = build_model_like(cfg)
        fresh = build_train_module(fresh_model, cfg, dims)
        fresh.load(where)
        counter = int(fresh_model.train_step)
        resumed = fresh.train_step(rank_share(step_batches(cfg, 2), dims.dp, dims.dp_rank), cfg.optim.lr)["loss"]
        results[overrides] = {"after": after, "resumed": resumed, "counter": counter, "unsafe_globals": unsafe}
    return results


def build_model_like(cfg):
    from mor_dist.model import build_model

    return build_model(cfg)  # seeded by the caller differently from model_for: loading must matter


def _plain(x):
    """A copy of nested state made of tensors, numbers, strings, lists and dicts only."""
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or type(x) in (bool, int, float, str):  # not an int-valued Enum
        return x
    return repr(vars(x)) if hasattr(x, "__dict__") else repr(x)


def _snapshot(module):
    """Everything an update could move: weights and buffers, the optimizer's whole state, counters."""
    optimizer = _plain(module.engine.optimizer.state_dict())
    optimizer.pop("overflow", None)  # ZeRO's flag "the last step overflowed": a report, not a state
    import deepspeed

    # ZeRO-3 holds each parameter as a partition: gather the whole weights to compare them.
    with deepspeed.zero.GatheredParameters(list(module.model.parameters()),
                                           enabled=module.engine.zero_optimization_stage() == 3):
        model = _plain(module.model.state_dict())
    return {"model": model, "optimizer": optimizer}


def nan_skip_cases(cases, poison_grad: bool = False):
    """Per case: a good step, then a step whose 2nd micro-batch has a NaN loss (nan_policy=skip) --
    or, with poison_grad, a finite loss and an infinite gradient (nan_policy=stop: the module skips
    the update and reports it; the trainer stops) -- then another good step. Returns the state
    before/after the skipped step and the metrics."""
    from mor_dist.parallel.train_module import build_train_module

    results = {}
    for name, overrides in cases:
        cfg = config(name, [f"train.nan_policy={'stop' if poison_grad else 'skip'}", *overrides])
        dims = _dims(cfg)
        module = build_train_module(model_for(cfg), cfg, dims)
        train_losses(module, cfg, dims, steps=1)
        before = _snapshot(module)
        calls = []

        def poison(mod, args, out):
            calls.append(1)
            if len(calls) != 2:
                return out
            if poison_grad:  # the loss stays finite; the gradient through the final norm does not
                out.register_hook(lambda g: g * float("inf"))
                return out
            return out * float("nan")

        hook = module.model.norm.register_forward_hook(poison)
        skipped = module.train_step(rank_share(step_batches(cfg, 1), dims.dp, dims.dp_rank), cfg.optim.lr)
        hook.remove()
        after = _snapshot(module)
        good = module.train_step(rank_share(step_batches(cfg, 2), dims.dp, dims.dp_rank), cfg.optim.lr)
        moved = _snapshot(module)
        results[(name, overrides)] = {"before": before, "after": after, "moved": moved, "skipped": skipped,
                                      "good": good}
    return results
