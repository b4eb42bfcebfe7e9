"""`mor train`: config -> model -> parallelize -> data -> trainer, in that order.

The run folder is only read until everything has loaded: the lock is taken, the config compared,
the checkpoint to resume chosen and checked, the model, parallelism and data built, the checkpoint
loaded. Only then is config.yaml written (and, for a new run, an earlier run's checkpoints set
aside): a start that fails on the way leaves the folder as it found it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

log = logging.getLogger("mor.train")


def setup_logging(run_dir: Path, rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger("mor")
    root.setLevel(level)
    root.handlers.clear()
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(fmt)
        root.addHandler(file)


def on_rank0(rank: int, fn):
    """fn() on rank 0, its result (or its exception) on every rank: no rank waits forever for a
    rank 0 that refused to start."""
    outcome = [None, None]
    if rank == 0:
        try:
            outcome = [fn(), None]
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            outcome = [None, e]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def train(cfg, force: bool = False) -> int:
    from mor_dist.checkpoint import CheckpointManager
    from mor_dist.data_pipeline.loader import build_loader, split_manifests
    from mor_dist.model import build_model
    from mor_dist.parallel.dims import init_distributed, shutdown_distributed
    from mor_dist.parallel.train_module import build_train_module
    from mor_dist.run_folder import RunLock, check_config
    from mor_dist.training.export import load_initial_weights
    from mor_dist.training.reshard import check_resume_fits, universal_source
    from mor_dist.training.trainer import Trainer, grad_accum_steps

    dims = init_distributed(cfg.parallel)
    if not torch.cuda.is_available():
        # Ranks sharing a CPU host split its cores; oversubscribed intra-op threads cost 10x here.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    run_dir = Path(cfg.logging.run_dir)
    created = on_rank0(dims.rank, lambda: _make_run_dir(run_dir))
    setup_logging(run_dir, dims.rank)
    lock = RunLock(run_dir)  # held by rank 0 only; released (a no-op elsewhere) however training ends
    started = False
    try:
        on_rank0(dims.rank, lambda: lock.acquire() and None)
        config_changes = on_rank0(dims.rank, lambda: check_config(cfg, force))
        grad_accum_steps(cfg, dims.dp)  # fail on a batch that does not split before building anything
        tokenizer = _tokenizer(cfg)  # and on a dataset made for another vocabulary

        ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.verify)
        resume_from, meta = None, None
        if cfg.checkpoint.resume:
            resume_from, meta, skipped = ckpt.resolve_resume()
            for why in skipped if dims.rank == 0 else ():
                log.warning("not resuming from a damaged checkpoint: %s", why)
        if resume_from is not None:
            check_resume_fits(resume_from, meta, cfg, dims)
        # A checkpoint saved at another layout (tensor / pipeline / data-parallel size, ZeRO stage) is
        # loaded through its universal copy, made now by rank 0 unless cached (RUN_DIR/universal/, a cache
        # beside the checkpoints, which stay as they are).
        universal = universal_source(resume_from, meta, cfg, dims) if resume_from is not None else None

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg)
        if cfg.checkpoint.init_from and resume_from is None:
            # Full weights before parallelize: every layout takes its shards from them.
            load_initial_weights(model, cfg.checkpoint.init_from, dims.rank)
        module = build_train_module(model, cfg, dims, load_universal=universal is not None)

        train_loader = build_loader(cfg.data, cfg.train.micro_batch_size, "train", rank=dims.dp_rank,
                                    world_size=dims.dp)
        val_loader = None
        if cfg.train.eval_interval and split_manifests(cfg.data, "val"):
            val_loader = build_loader(cfg.data, cfg.train.micro_batch_size, "val", rank=dims.dp_rank, world_size=dims.dp)
        elif cfg.train.eval_interval and dims.rank == 0:
            log.warning("the dataset has no validation split: no evaluation (prepare with data.val_fraction > 0)")

        from mor_dist.parallel.engine import uses_bf16
        from mor_dist.training.peak_flops import resolve_peak_tflops

        dtype = torch.bfloat16 if uses_bf16(cfg) else torch.float32
        cfg.logging.peak_tflops = resolve_peak_tflops(cfg.logging.peak_tflops, dims.rank, dtype)  # for MFU
        trainer = Trainer(cfg, dims, module, train_loader, val_loader, tokenizer, run_dir)
        if dims.rank == 0:
            log.info("run folder %s | world %d (dp %d, tp %d, pp %d) | %d micro-batches of %d per step",
                     run_dir, dims.world, dims.dp, dims.tp, dims.pp, trainer.accum, cfg.train.micro_batch_size)
        if resume_from is not None:
            trainer.resume(resume_from, meta, universal)
        on_rank0(dims.rank, lambda: _commit_start(cfg, ckpt, config_changes, resume_from is not None))
        started = True

        code = trainer.fit()
        if dims.rank == 0:
            log.info("TensorBoard: tensorboard --logdir %s", run_dir / "tensorboard")
        shutdown_distributed(dims)
        return code
    finally:
        # Only by the start that holds the folder's lock, while it holds it: a second start racing for
        # the same new folder must not remove the first one's lock and log.
        if created and not started and lock.held:
            _remove_new_run_dir(run_dir)
        lock.release()


def _make_run_dir(run_dir: Path) -> bool:
    """Create the run folder (rank 0); True when this start created it. A path that is a file or
    cannot be created is refused in one line."""
    from mor_dist.run_folder import RunDirError

    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: is a file, not a folder; give logging.run_dir a folder (created if missing)")
    existed = run_dir.is_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = (e.strerror or str(e))[:1].lower() + (e.strerror or str(e))[1:]
        raise RunDirError(f"{run_dir}: cannot be created ({what}); give logging.run_dir a folder you can "
                          "write to") from None
    return not existed


def _remove_new_run_dir(run_dir: Path) -> None:
    """A first start that failed before training leaves no folder behind: the one it created holds
    only its log and lock (anything else there is kept)."""
    for name in ("train.log", "run.lock"):
        (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:  # not empty: something else was written there, keep it
        pass


def dry_run(cfg, force: bool = False) -> int:
    """`mor train --dry-run`: what a start would check, with nothing started and nothing written --
    the resolved config, the layout, the memory plan, the data and the run folder -- then exit.
    The same mistakes a start refuses end in the same one-line errors."""
    from mor_dist.checkpoint import CheckpointManager
    from mor_dist.config import to_yaml
    from mor_dist.data_pipeline.loader import build_loader, split_manifests
    from mor_dist.model.accounting import model_info
    from mor_dist.parallel.plan import OVERHEAD_FRACTION, estimate
    from mor_dist.run_folder import check_config
    from mor_dist.training.reshard import check_model_shape, check_resume_fits
    from mor_dist.training.trainer import grad_accum_steps

    p, t = cfg.parallel, cfg.train
    # The world of a launch under torchrun / srun, else the smallest the layout needs.
    world = int(os.environ.get("WORLD_SIZE", p.tensor * p.pipeline))
    stages, dp = estimate(cfg, world)
    accum = grad_accum_steps(cfg, dp)
    tokenizer = _tokenizer(cfg)
    build_loader(cfg.data, t.micro_batch_size, "train", rank=0, world_size=dp)  # manifests, seq_len, shards listed
    val = split_manifests(cfg.data, "val") if t.eval_interval else []
    changes = check_config(cfg, force)
    # The checkpoint a start would pick, its files' sizes checked (a start also checks their sha256),
    # and whether it fits this model and layout (a --force that changed the model's shape is refused).
    mgr = CheckpointManager(Path(cfg.logging.run_dir), cfg.checkpoint.keep_last, "size")
    latest, resume_from, skipped = mgr.latest_name(), None, []
    launched = "WORLD_SIZE" in os.environ  # the world is known under a launcher; on a login node, only at start
    if cfg.checkpoint.resume:
        resume_from, meta, skipped = mgr.resolve_resume()
        if resume_from is not None and launched:
            check_resume_fits(resume_from, meta, cfg, SimpleNamespace(tp=p.tensor, pp=p.pipeline, dp=dp, rank=0))
        elif resume_from is not None:  # a login node: the data-parallel size and the GPU's precision come at start
            check_model_shape(resume_from, meta, cfg)

    info = model_info(cfg)
    lay, params = info["layout"], info["params"]
    peak = max(s.total for s in stages) * (1 + OVERHEAD_FRACTION)
    samples = sum(m.data["splits"]["train"]["samples"] for m, _, _ in split_manifests(cfg.data, "train"))
    print(to_yaml(cfg), end="")
    print("---")
    print(f"model       {params['non_embedding']:,} non-embedding parameters; {lay['prefix_layers']} + "
          f"{lay['layers_per_block']} x {lay['recursions']} recursions + {lay['suffix_layers']} layers, "
          f"routing {lay['routing']}, kv {lay['kv']}")
    print(f"layout      world {world} = tensor {p.tensor} x data {dp} x pipeline {p.pipeline}, ZeRO-{p.zero_stage}; "
          f"{accum} micro-batch(es) of {t.micro_batch_size} per rank per step")
    print(f"run length  {t.steps} steps x {t.global_batch_size * cfg.data.seq_len:,} tokens")
    print(f"memory      peak per rank {peak / 2**30:.2f} GiB (parameters, gradients, optimizer, activations, "
          f"+{OVERHEAD_FRACTION:.0%}; `mor plan` has the table)")
    print(f"data        {cfg.data.dataset_dir}: {samples:,} training sequences of {cfg.data.seq_len} tokens, "
          f"tokenizer of {tokenizer.get_vocab_size()} tokens; validation "
          + ("split found" if val else "off" if not t.eval_interval else "split MISSING: no evaluation"))
    if resume_from is not None:
        checked = "" if launched else " (its layout is checked at start, where the world is known)"
        folder = f"resumes from checkpoints/{resume_from.name}{checked}" + "".join(
            f"\n  skipped: {why}" for why in skipped)
    else:
        folder = "new run (earlier checkpoints set aside)" if latest or skipped else "new run"
    forced = f"; --force: {len(changes)} config change(s)" if changes else ""
    print(f"run folder  {cfg.logging.run_dir}: {folder}{forced}")
    print("dry run: nothing started, nothing written")
    return 0


def _commit_start(cfg, ckpt, config_changes: list[str], resumed: bool) -> None:
    """Everything loaded: the folder now belongs to this config."""
    from mor_dist.run_folder import write_config

    if not resumed:
        aside = ckpt.set_aside()
        if aside is not None:
            log.warning("starting a new run in a folder with checkpoints: they are kept, moved to %s", aside)
        log.info("starting a new run")
    if config_changes:
        log.warning("--force: continuing with a changed config (the previous config.yaml is kept beside it):\n  %s",
                    "\n  ".join(config_changes))
    write_config(cfg, config_changes)


def _tokenizer(cfg):
    """The dataset's tokenizer (TensorBoard decodes validation text with it). A dataset tokenized for
    another vocabulary than the model's is refused, larger or smaller, before anything is built."""
    from mor_dist.config import ConfigError
    from mor_dist.data_pipeline.loader import dataset_tokenizer

    size, where, tokenizer = dataset_tokenizer(cfg.data)
    if size != cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} differs from the dataset's tokenizer ({where}: {size} tokens); "
            f"set model.vocab_size={size}, or prepare the dataset for this model with `mor data prepare --config "
            "CONFIG` (it trains the tokenizer at model.vocab_size)"
        )
    return tokenizer
