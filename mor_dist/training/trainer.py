"""The training loop. It owns the schedule of things (steps, evals, checkpoints, signals) and calls
small pieces for each concern; the model, its parallelism and the optimizer live in the train module.

Train-module contract (mor_dist/parallel/train_module.py):
    train_step(micro_batches, lr) -> dict   # loss, lm_loss, aux/*, stats/*, grad_norm, skipped
    eval_step(tokens, targets) -> (loss, depth)   # causal routing
    save(folder) / load(folder)                   # sharded model + optimizer state
    model                                          # the MoRModel (unwrapped)
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from mor_dist.model.accounting import train_flops_per_token
from mor_dist.parallel.dims import comm_device
from mor_dist.checkpoint import CheckpointManager
from mor_dist.training.schedule import lr_multiplier
from mor_dist.training.signals import EXIT_PREEMPTED, PreemptionFlag
from mor_dist.training.tb_logger import TensorBoardLogger

log = logging.getLogger("mor.train")

SPIKE_FACTOR = 3.0  # a loss this many times its running mean is logged as a spike


class NonFiniteLossError(RuntimeError):
    pass


def grad_accum_steps(cfg, dp: int) -> int:
    t = cfg.train
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        from mor_dist.config import ConfigError

        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x data-parallel size {dp}; change it or train.micro_batch_size"
        )
    return t.global_batch_size // per_step


class Trainer:
    def __init__(self, cfg, dims, module, train_loader, val_loader, tokenizer, run_dir):
        self.cfg, self.dims, self.module = cfg, dims, module
        self.train_loader, self.val_loader, self.tokenizer = train_loader, val_loader, tokenizer
        self.run_dir = run_dir
        self.rank0 = dims.rank == 0
        self.ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.verify)
        self.tb = TensorBoardLogger(run_dir / "tensorboard", cfg.logging.tensorboard and self.rank0)
        t = cfg.train
        self.accum = grad_accum_steps(cfg, dims.dp)
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.flops_per_token = train_flops_per_token(cfg)
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.loss_ema = None

    # ------------------------------------------------------------------ resume / save
    def resume(self, folder, meta: dict, universal=None) -> None:
        """Continue from a checked checkpoint (CheckpointManager.resolve_resume); model/optimizer from
        `universal` when the data-parallel size changed."""
        self.module.load(universal or folder)
        self.train_loader.load_state_dict(meta["loader"])
        self.ckpt.restore_rng(folder)
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        if self.rank0:
            log.info("resumed from %s (step %d, %d tokens seen, saved by %d ranks)", folder, self.step,
                     self.tokens_seen, meta["world_size"])

    def save(self) -> None:
        t0 = time.time()
        meta = {
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "loader": self.train_loader.state_dict(),
            "data_parallel_size": self.dims.dp,
            # The resolved config travels with every checkpoint (the lr schedule is a pure function of
            # the step and this config, so it needs no state of its own).
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        path = self.ckpt.save(self.step, meta, self.module.save)
        if self.rank0:
            log.info("checkpoint %s written in %.1fs", path, time.time() - t0)

    # ------------------------------------------------------------------ loop
    def fit(self) -> int:
        t = self.cfg.train
        flag = PreemptionFlag()
        batches = iter(self.train_loader)
        last_log = time.time()
        window_tokens, window_wait = 0, 0.0
        try:
            while self.step < t.steps:
                wait0 = time.time()
                micro = [self._split(next(batches)["tokens"]) for _ in range(self.accum)]
                window_wait += time.time() - wait0
                lr = self.cfg.optim.lr * lr_multiplier(self.step, t.steps, self.cfg.schedule)
                metrics = self.module.train_step(micro, lr)
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                window_tokens += self.tokens_per_step
                self._check_loss(metrics)
                if self.step % self.cfg.logging.log_interval == 0 or self.step == t.steps:
                    now = time.time()
                    self._log_train(metrics, lr, window_tokens / (now - last_log), window_wait)
                    last_log, window_tokens, window_wait = now, 0, 0.0
                if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps):
                    self.evaluate()
                preempted = flag.agreed()
                if preempted or self.step % self.cfg.checkpoint.interval == 0 or self.step == t.steps:
                    self.save()
                if preempted:
                    if self.rank0:
                        log.warning("signal %s received: checkpoint at step %d written, exiting with %d for requeue",
                                    flag.received, self.step, EXIT_PREEMPTED)
                    return EXIT_PREEMPTED
        finally:
            flag.restore()
            self.tb.close()
        if self.rank0:
            log.info("done: %d steps, %d tokens", self.step, self.tokens_seen)
        return 0

    def _split(self, tokens: torch.Tensor):
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def _check_loss(self, metrics: dict) -> None:
        loss = metrics["loss"]
        if not math.isfinite(loss):
            if self.cfg.train.nan_policy == "skip":
                self.skipped_steps += 1
                if self.rank0:
                    log.warning("step %d: non-finite loss %s, update skipped (%d so far)", self.step, loss,
                                self.skipped_steps)
                self.tb.scalars({"train/skipped_steps": self.skipped_steps}, self.step)
                return
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) at step {self.step}; the last good checkpoint is kept. Lower optim.lr, "
                "check the data, or set train.nan_policy=skip to skip such steps"
            )
        if self.loss_ema is not None and self.step > 20 and loss > SPIKE_FACTOR * self.loss_ema:
            if self.rank0:
                log.warning("step %d: loss spike %.3f (running mean %.3f)", self.step, loss, self.loss_ema)
            self.tb.scalars({"train/loss_spike": loss / self.loss_ema}, self.step)
        self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss

    def _log_train(self, metrics: dict, lr: float, tokens_per_s: float, data_wait: float) -> None:
        if not self.rank0:
            return
        peak = self.cfg.logging.peak_tflops * 1e12 * self.dims.world
        scalars = {
            "train/loss": metrics["loss"],
            "train/lm_loss": metrics.get("lm_loss"),
            "train/lr": lr,
            "train/grad_norm": metrics.get("grad_norm"),
            "train/tokens_per_s": tokens_per_s,
            "train/mfu": self.flops_per_token * tokens_per_s / peak,
            "train/data_wait_s": data_wait,
            "train/tokens_seen": self.tokens_seen,
            "train/peak_memory_gib": _peak_memory_gib(),
        }
        for key, value in metrics.items():
            if key.startswith(("aux/", "stats/")):
                scalars[("train/" + key[4:]) if key.startswith("aux/") else ("routing/" + key[6:])] = value
        self.tb.scalars(scalars, self.step)
        self._log_data()
        remaining = (self.cfg.train.steps - self.step) * self.tokens_per_step / max(tokens_per_s, 1e-9)
        log.info("step %d/%d | loss %.4f | lr %.2e | %.0f tok/s | data wait %.2fs | ETA %s", self.step,
                 self.cfg.train.steps, metrics["loss"], lr, tokens_per_s, data_wait, _hms(remaining))

    def _log_data(self) -> None:
        """data/tokens/<source>: tokens each data source has given all ranks (from the loader's state,
        so no communication and the same after a resume)."""
        counts = self.train_loader.source_samples()
        self.tb.scalars({f"data/tokens/{name}": n * self.cfg.data.seq_len
                         for name, n in zip(self.train_loader.source_names(), counts)}, self.step)

    # ------------------------------------------------------------------ validation
    def evaluate(self) -> float | None:
        if self.val_loader is None:
            return None
        total, count, sample = 0.0, 0, None
        for i, batch in enumerate(self.val_loader):
            if i >= self.cfg.train.eval_batches:
                break
            inputs, targets = self._split(batch["tokens"])
            loss, depth = self.module.eval_step(inputs, targets)
            total, count = total + loss, count + 1
            if sample is None:
                sample = (inputs[0], depth[0])
        self.val_loader.load_state_dict(self.val_loader.state_dict() | {"position": 0})
        stats = torch.tensor([total, count], dtype=torch.float64, device=comm_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        if stats[1] == 0:
            return None
        val = (stats[0] / stats[1]).item()
        if self.rank0:
            self.tb.scalars({"val/loss": val, "val/ppl": math.exp(min(val, 50.0))}, self.step)
            if sample is not None:
                pieces = [self.tokenizer.decode([int(t)]) for t in sample[0]] if self.tokenizer else [
                    str(int(t)) for t in sample[0]]
                self.tb.depth_panel(pieces, sample[1], self.module.model.layout.recursions, self.step)
            self.tb.flush()
            log.info("step %d | val loss %.4f | val ppl %.2f", self.step, val, math.exp(min(val, 50.0)))
        return val


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
