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
import os
import sys
import time

import torch
from omegaconf import OmegaConf

from mor_dist.model.accounting import train_flops_per_token
from mor_dist.parallel.engine import uses_bf16
from mor_dist.checkpoint import CheckpointManager
from mor_dist.training.schedule import lr_multiplier
from mor_dist.training.signals import EXIT_PREEMPTED, PreemptionFlag
from mor_dist.training.dashboard import GUIDE, EvalTally, memory_scalars, param_norm, train_depth_shares
from mor_dist.training.depth_view import depth_image, depth_markdown
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
        # Throughput counts training only: evaluation and the blocking part of checkpoint saves add
        # their time to _paused_s, which is taken out of the window between two log points.
        self._paused_s = 0.0
        self._mark: tuple[float, int] | None = None  # (time, step) of this process's previous log point
        self._started_tb = False  # the run's guide and config go to TensorBoard once per start

    # ------------------------------------------------------------------ resume / save
    def resume(self, folder, meta: dict, universal=None) -> None:
        """Continue from a checked checkpoint (CheckpointManager.resolve_resume); model, optimizer and
        buffers from `universal` (its layout-free copy, training/reshard.py) when the layout changed.
        The step, the data position and so the lr schedule come from meta.json either way."""
        self.module.load(universal or folder)
        self.train_loader.load_state_dict(meta["loader"])
        self.ckpt.restore_rng(folder)
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        if self.rank0:
            how = f", at another layout through {universal}" if universal is not None else ""
            log.info("resumed from %s (step %d, %d tokens seen, saved by %d ranks%s)", folder, self.step,
                     self.tokens_seen, meta["world_size"], how)

    def save(self) -> None:
        """Checkpoint at this step boundary. With checkpoint.async_save the state is only copied to host
        memory here; a background thread writes it while training goes on (the next save and the end
        of fit wait for it). The time spent here is taken out of the throughput window."""
        t0 = time.time()
        meta = {
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "loader": self.train_loader.state_dict(),
            "data_parallel_size": self.dims.dp,
            "bf16": uses_bf16(self.cfg),  # part of the layout (training/reshard.py)
            "workdir": os.getcwd(),  # what relative data paths in the config are relative to (export)
            "reshardable": True,  # save_engine records the name map a tensor/pipeline change needs
            # The resolved config travels with every checkpoint (the lr schedule is a pure function of
            # the step and this config, so it needs no state of its own).
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        background = self.cfg.checkpoint.async_save

        def done(path):
            if self.rank0:
                log.info("checkpoint %s written in %.1fs%s", path, time.time() - t0,
                         " (in the background)" if background else "")

        self.ckpt.save(self.step, meta, self.module.save, background=background, on_done=done)
        blocked = time.time() - t0
        self._paused_s += blocked
        if background and self.rank0:
            log.info("checkpoint of step %d copied to host memory in %.2fs; writing it in the background",
                     self.step, blocked)

    def wait_for_save(self) -> None:
        """The end of fit: let a background save finish (its error, if any, stops the run). Not while
        another error is on its way out: a save then left unfinished never reaches `latest`."""
        if sys.exc_info()[0] is None or isinstance(sys.exc_info()[1], NonFiniteLossError):
            self.ckpt.wait()

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
                # Per-group gradient norms cost collectives: only on the steps that log.
                logs = (self.step + 1) % self.cfg.logging.log_interval == 0 or self.step + 1 == t.steps
                metrics = self.module.train_step(micro, lr, detail=logs and self.dims.pp == 1)
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
            self.wait_for_save()
            flag.restore()
            self.tb.close()
        if self.rank0:
            log.info("done: %d steps, %d tokens", self.step, self.tokens_seen)
        return 0

    def _split(self, tokens: torch.Tensor):
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def _check_loss(self, metrics: dict) -> None:
        """A non-finite loss, or non-finite gradients (the optimizer skipped the update), stops the
        run before anything of the step is saved, or (train.nan_policy=skip) is counted and passed."""
        loss = metrics["loss"]
        if not math.isfinite(loss) or metrics.get("skipped"):
            what = f"non-finite loss ({loss})" if not math.isfinite(loss) else \
                f"non-finite gradients (loss {loss:.4g}, gradient norm {metrics.get('grad_norm')})"
            if self.cfg.train.nan_policy == "skip":
                self.skipped_steps += 1
                if self.rank0:
                    log.warning("step %d: %s, update skipped (%d so far)", self.step, what, self.skipped_steps)
                self.tb.scalars({"train/skipped_steps": self.skipped_steps}, self.step)
                return
            raise NonFiniteLossError(
                f"{what} at step {self.step}; the update was not applied and nothing of this step is saved "
                f"(the last checkpoint is kept). Lower optim.lr, check the data, or set train.nan_policy=skip "
                "to skip such steps"
            )
        if self.loss_ema is not None and self.step > 20 and loss > SPIKE_FACTOR * self.loss_ema:
            if self.rank0:
                log.warning("step %d: loss spike %.3f (running mean %.3f)", self.step, loss, self.loss_ema)
            self.tb.scalars({"train/loss_spike": loss / self.loss_ema}, self.step)
        self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss

    def _train_rate(self, fit_rate: float) -> float | None:
        """Training tokens/s since the previous log point. At the first one after a start, fit's rate
        (its window began at the loop's start, unseen here), unless an evaluation fell inside it."""
        now, paused = time.time(), self._paused_s
        mark, self._mark, self._paused_s = self._mark, (now, self.step), 0.0
        if mark is None:
            return fit_rate if paused == 0 else None
        busy = now - mark[0] - paused
        return (self.step - mark[1]) * self.tokens_per_step / busy if busy > 0 else None

    def _log_train(self, metrics: dict, lr: float, tokens_per_s: float, data_wait: float) -> None:
        norm = param_norm(self.module.model, self.dims)  # a collective: before the rank-0 check
        rate = self._train_rate(tokens_per_s)
        if not self.rank0:
            return
        if not self._started_tb:
            self._started_tb = True
            self._log_run_info()
        peak = self.cfg.logging.peak_tflops * 1e12 * self.dims.world
        scalars = {
            "train/loss": metrics["loss"],
            "train/lm_loss": metrics.get("lm_loss"),
            "train/lr": lr,
            "train/grad_norm": metrics.get("grad_norm"),
            "train/param_norm": norm,
            "train/tokens_seen": self.tokens_seen,
            "train_system/data_wait_s": data_wait,
            **memory_scalars(),
        }
        if rate is not None:
            scalars |= {
                "train_system/tokens_per_s": rate,
                "train_system/tokens_per_s_per_device": rate / self.dims.world,
                "train_system/step_time_s": self.tokens_per_step / rate,
                "train_system/mfu": self.flops_per_token * rate / peak,
            }
        rt = self.cfg.routing
        for key, value in metrics.items():
            if key.startswith("aux/"):
                scalars["train/" + key[4:]] = value
            elif key.startswith("grad_norm/"):  # per router / shared block, where the train module reports them
                scalars["train/" + key] = value
            elif key.startswith("stats/"):
                name = key[6:]
                # Flat by construction, not plotted: expert-choice active fractions are the capacity
                # (the depth histogram shows them), router biases move only with loss-free balancing.
                if name.startswith("active_frac/") and rt.type != "token":
                    continue
                if name.startswith("router_bias/") and rt.balancing != "loss_free":
                    continue
                scalars["train_routing/" + name] = value
        self.tb.scalars(scalars, self.step)
        self.tb.scalars({"train/loss_vs_tokens": metrics["loss"]}, self.tokens_seen)
        shares = train_depth_shares(metrics, self.module.model.layout.recursions) if rt.type != "none" else None
        if shares is not None:
            self.tb.depth_histogram("train_routing/depth", [s * self.tokens_per_step for s in shares], self.step)
        self._log_data()
        shown = rate if rate is not None else tokens_per_s
        remaining = (self.cfg.train.steps - self.step) * self.tokens_per_step / max(shown, 1e-9)
        log.info("step %d/%d | loss %.4f | lr %.2e | %.0f tok/s | data wait %.2fs | ETA %s", self.step,
                 self.cfg.train.steps, metrics["loss"], lr, shown, data_wait, _hms(remaining))

    def _log_run_info(self) -> None:
        """Once per start: the guide to the charts, and the resolved config as text and hparams."""
        from mor_dist.config import to_yaml

        self.tb.text("about/how_to_read", GUIDE, self.step)
        tree = OmegaConf.to_container(self.cfg, resolve=True)
        # HPARAMS compares runs by what defines the experiment, not by paths and intervals.
        hparams = {k: tree[k] for k in ("model", "routing", "kv", "optim", "schedule", "train")}
        hparams["data"] = {"seq_len": tree["data"]["seq_len"]}
        self.tb.config(to_yaml(self.cfg), hparams, ["train/loss", "val/loss", "val/loss_topk", "val/routing_gap"],
                       self.step)

    def _log_data(self) -> None:
        """data/tokens/<source>: tokens each data source has given all ranks (from the loader's state,
        so no communication and the same after a resume). One source would repeat train/tokens_seen."""
        names = self.train_loader.source_names()
        if len(names) < 2:
            return
        counts = self.train_loader.source_samples()
        self.tb.scalars({f"data/tokens/{name}": n * self.cfg.data.seq_len
                         for name, n in zip(names, counts)}, self.step)

    # ------------------------------------------------------------------ validation
    def evaluate(self) -> float | None:
        if self.val_loader is None:
            return None
        t0 = time.time()
        try:
            return self._evaluate()
        finally:
            self._paused_s += time.time() - t0

    def _evaluate(self) -> float | None:
        """Validation in both routing modes: causal (what inference does, eval_step) and, for
        expert-choice, top-k (what training does; token-choice depths are causal already). Not under
        pipeline stages: their eval step runs the causal schedule only."""
        nr = self.module.model.layout.recursions
        topk = self.cfg.routing.type == "expert" and self.dims.pp == 1
        tally = EvalTally(nr)
        for i, batch in enumerate(self.val_loader):
            if i >= self.cfg.train.eval_batches:
                break
            inputs, targets = self._split(batch["tokens"])
            loss, depth = self.module.eval_step(inputs, targets)
            tally.add(inputs, loss, depth, *(self._eval_topk(inputs, targets) if topk else ()))
        self.val_loader.load_state_dict(self.val_loader.state_dict() | {"position": 0})
        tally.reduce(copies=self.dims.tp * self.dims.pp)
        if tally.batches == 0:
            return None
        val = tally.loss()
        if self.rank0:
            self._log_eval(tally, nr)
            log.info("step %d | val loss %.4f | val ppl %.2f", self.step, val, math.exp(min(val, 50.0)))
        return val

    @torch.no_grad()
    def _eval_topk(self, inputs, targets) -> tuple[float, torch.Tensor]:
        model = self.module.model
        model.eval()
        device = self.module.engine.device
        out = model(inputs.to(device), targets.to(device), mode="topk")
        model.train()
        return out.lm_loss.item(), out.depth.cpu()

    def _log_eval(self, tally: EvalTally, nr: int) -> None:
        val = tally.loss()
        scalars = {"val/loss": val, "val/ppl": math.exp(min(val, 50.0))}
        routed = self.cfg.routing.type != "none"
        shares = {}
        if routed:
            counts = tally.depth_counts("causal")
            shares["causal (inference)"] = [c / max(sum(counts), 1) for c in counts]
            self.tb.depth_histogram("val/depth_causal", counts, self.step)
        if tally.has_topk():
            same, early = tally.agreement()
            scalars |= {"val/loss_topk": tally.loss_topk(), "val/routing_gap": val - tally.loss_topk(),
                        "val/depth_agreement": same, "val/stopped_early": early}
            counts = tally.depth_counts("topk")
            shares["top-k (training)"] = [c / max(sum(counts), 1) for c in counts]
            self.tb.depth_histogram("val/depth_topk", counts, self.step)
        self.tb.scalars(scalars, self.step)
        self.tb.scalars({"val/loss_vs_tokens": val}, self.tokens_seen)
        if routed and tally.samples:
            samples = [(self._pieces(tokens), depth.tolist()) for tokens, depth in tally.samples]
            self.tb.image("val/depth_map", depth_image(samples, nr, shares["causal (inference)"]), self.step)
            heading = (f"**Recursion depth of validation tokens**, step {self.step}: how many times the shared "
                       f"block ran on each (0 = none, {nr} = every recursion), with causal routing -- the "
                       "decisions inference makes. The superscript after each token is its depth.")
            self.tb.text("val/depths", depth_markdown(samples, nr, shares, heading), self.step)
        self.tb.flush()

    def _pieces(self, tokens) -> list[str]:
        if self.tokenizer is None:
            return [f"{int(t)} " for t in tokens]
        return [self.tokenizer.decode([int(t)]) for t in tokens]


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
