"""`mor train`: config -> model -> parallelize -> data -> trainer, in that order."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

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


def train(cfg, force: bool = False) -> int:
    from mor_dist.data_pipeline.loader import build_loader
    from mor_dist.data_pipeline.manifest import load_manifest
    from mor_dist.model import build_model
    from mor_dist.parallel.dims import init_distributed
    from mor_dist.parallel.train_module import build_train_module
    from mor_dist.training.export import load_initial_weights
    from mor_dist.training.reshard import check_resume_layout, universal_source
    from mor_dist.training.run_dir import prepare_run_dir
    from mor_dist.training.trainer import Trainer, grad_accum_steps

    dims = init_distributed(cfg.parallel)
    if not torch.cuda.is_available():
        # Ranks sharing a CPU host split its cores; oversubscribed intra-op threads cost 10x here.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    run_dir = Path(cfg.logging.run_dir)
    setup_logging(run_dir, dims.rank)
    # Before the run folder is touched: a checkpoint to resume must have this run's TP/PP sizes.
    resuming = cfg.checkpoint.resume and check_resume_layout(run_dir, dims.tp, dims.pp) is not None
    if dims.rank == 0:
        prepare_run_dir(cfg, force)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank starts on a folder rank 0 refused

    grad_accum_steps(cfg, dims.dp)  # fail on a batch that does not split before building anything
    # A checkpoint saved at another data-parallel size is loaded through a universal conversion.
    universal = universal_source(run_dir, cfg.checkpoint.keep_last, dims.dp, dims.rank) if resuming else None

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg)
    if cfg.checkpoint.init_from and not resuming:
        # Full weights before parallelize: every layout takes its shards from them.
        load_initial_weights(model, cfg.checkpoint.init_from, dims.rank)
    module = build_train_module(model, cfg, dims, load_universal=universal is not None)

    train_loader = build_loader(cfg.data, cfg.train.micro_batch_size, "train", rank=dims.dp_rank, world_size=dims.dp)
    val_loader = None
    if cfg.train.eval_interval and load_manifest(cfg.data.dataset_dir).data["splits"].get("val", {}).get("samples"):
        val_loader = build_loader(cfg.data, cfg.train.micro_batch_size, "val", rank=dims.dp_rank, world_size=dims.dp)
    elif cfg.train.eval_interval and dims.rank == 0:
        log.warning("the dataset has no validation split: no evaluation (prepare with data.val_fraction > 0)")
    tokenizer = _tokenizer(cfg)
    vocab = tokenizer.get_vocab_size() if tokenizer else None
    if vocab and vocab > cfg.model.vocab_size:
        raise ValueError(
            f"the dataset's tokenizer has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size"
        )

    trainer = Trainer(cfg, dims, module, train_loader, val_loader, tokenizer, run_dir)
    if dims.rank == 0:
        log.info("run folder %s | world %d (dp %d, tp %d, pp %d) | %d micro-batches of %d per step",
                 run_dir, dims.world, dims.dp, dims.tp, dims.pp, trainer.accum, cfg.train.micro_batch_size)
    if not trainer.resume(universal) and dims.rank == 0:
        log.info("starting a new run")
    code = trainer.fit()
    if dims.rank == 0:
        log.info("TensorBoard: tensorboard --logdir %s", run_dir / "tensorboard")
    return code


def _tokenizer(cfg):
    from tokenizers import Tokenizer

    path = Path(cfg.data.tokenizer or Path(cfg.data.dataset_dir) / "tokenizer.json")
    return Tokenizer.from_file(str(path)) if path.is_file() else None
