"""The config tree: one structured dataclass per component, validated by OmegaConf.

Every key is documented where it is declared; every numeric key declares its allowed range with
`ranged(default, spec)` (">= 1", "> 0", "[0, 1)", ...; a list's range applies to each item), which
validate.py checks together with the rules that span several keys. YAML files under configs/ and
command-line dotlist overrides (`model.recursions=3`) are merged onto these; unknown or ill-typed keys
fail at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from mor_dist.data_pipeline.config import DataConfig, ranged


@dataclass
class ModelConfig:
    vocab_size: int = ranged(49152, ">= 1")
    d_model: int = ranged(960, ">= 1")
    # L: layers of the vanilla model. Recursive/MoR models derive their layout from it (see sharing).
    n_layers: int = ranged(32, ">= 1")
    n_heads: int = ranged(15, ">= 1")
    n_kv_heads: int = ranged(5, ">= 1")  # grouped-query attention; must divide n_heads
    head_dim: Optional[int] = ranged(None, ">= 2")  # even (RoPE rotates pairs); default d_model // n_heads
    d_ff: int = ranged(2560, ">= 1")  # SwiGLU hidden size
    max_seq_len: int = ranged(2048, ">= 1")  # RoPE table size; data.seq_len must not exceed it
    rope_theta: float = ranged(10000.0, "> 0")
    norm_eps: float = ranged(1e-5, "> 0")
    tie_embeddings: bool = True  # input embedding reused as output head (Llama/SmolLM)
    init_std: float = ranged(0.02, "> 0")
    # Nr: number of recursions of the shared block. 1 with sharing=none is the vanilla model.
    recursions: int = ranged(1, ">= 1")
    # none | cycle | sequence | middle_cycle | middle_sequence (MOR.md section 2).
    sharing: str = "none"
    # When the shared layers do not divide by recursions, add layers (the paper's MoR-4 at 360m uses
    # 34 = 1 + 8x4 + 1) instead of failing.
    pad_layers: bool = False


@dataclass
class RoutingConfig:
    # none (vanilla / plain recursive) | expert (expert-choice, default MoR) | token (token-choice)
    type: str = "none"
    router: str = "linear"  # linear: Linear(d,1|Nr); mlp: Linear(d,2d)-GELU-Linear(2d,.)
    # Gate scale: g = alpha * sigmoid(logit) (expert); token-choice softmax default 1.0, sigmoid 0.1.
    alpha: Optional[float] = ranged(None, "> 0")
    # Expert-choice capacity c_r per step, one per recursion; None = (Nr - r + 1) / Nr. Each in
    # (0, 1], non-increasing.
    capacity: Optional[List[float]] = ranged(None, "(0, 1]")
    capacity_warmup_steps: int = ranged(0, ">= 0")  # cosine from 1.0 down to c_r over this many optimizer steps
    # How the causal (inference-time) decision is learned: aux_loss = BCE on the router logit;
    # aux_router = a second router on detached inputs predicts top-k membership.
    causal_method: str = "aux_loss"
    aux_loss_coef: float = ranged(0.001, ">= 0")  # BCE, averaged over candidates, summed over steps
    z_loss_coef: float = ranged(0.0, ">= 0")  # router z-loss; 1e-3 when on
    # weighted: selected tokens get H + g*f(H) (paper). none: selected tokens get f(H) and the router
    # learns only from its aux loss -- a diagnostic; at capacity 1.0 it is exactly the recursive model.
    gating: str = "weighted"
    # Token-choice
    token_func: str = "softmax"  # softmax | sigmoid
    balancing: str = "loss"  # loss | loss_free | none
    balance_coef: float = ranged(0.1, ">= 0")
    bias_update_rate: float = ranged(0.001, ">= 0")  # loss-free balancing: b_i += rate * sign(mean_load - load_i)
    max_depth_warmup_steps: int = ranged(0, ">= 0")  # token-choice: force the deepest recursion for this many steps


@dataclass
class KVConfig:
    # recursion_wise: attention at depth r among tokens active at r; share: reuse recursion 1's K/V.
    strategy: str = "recursion_wise"


@dataclass
class OptimConfig:
    lr: float = ranged(3e-3, "> 0")
    betas: List[float] = ranged([0.9, 0.95], "[0, 1)")  # exactly two: Adam's beta1, beta2
    eps: float = ranged(1e-8, "> 0")
    weight_decay: float = ranged(0.1, ">= 0")
    grad_clip: float = ranged(1.0, ">= 0")  # max global grad norm; 0 disables clipping


@dataclass
class ScheduleConfig:
    name: str = "wsd"  # wsd (trapezoid: warmup-stable-decay, paper default) | cosine | constant
    # warmup_fraction + decay_fraction <= 1
    warmup_fraction: float = ranged(0.05, "[0, 1]")
    decay_fraction: float = ranged(0.2, "[0, 1]")  # wsd: linear cooldown over the last fraction of steps
    min_lr_ratio: float = ranged(0.0, "[0, 1]")  # final lr as a fraction of optim.lr


@dataclass
class TrainConfig:
    steps: int = ranged(1000, ">= 1")  # optimizer steps
    # A run's length as a budget instead (at most one of the two): training FLOPs in the paper's
    # accounting (model/accounting.py: 3 x forward) or tokens. Set, it replaces `steps` with the
    # whole steps it buys (config/budget.py); the lr schedule follows. `mor info` prints the result.
    flops_budget: Optional[float] = ranged(None, "> 0")
    tokens: Optional[float] = ranged(None, ">= 1")  # a float so that 20e9 reads as written
    # Sequences per optimizer step, across data-parallel ranks: a multiple of micro_batch_size x
    # the data-parallel size (the remaining factor is gradient accumulation).
    global_batch_size: int = ranged(1024, ">= 1")
    micro_batch_size: int = ranged(4, ">= 1")  # sequences per forward on one rank
    seed: int = ranged(1234, "[0, 4294967295]")
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    eval_interval: int = ranged(200, ">= 0")  # optimizer steps between evaluations; 0 = never
    eval_batches: int = ranged(20, ">= 0")  # micro-batches per evaluation; >= 1 when eval_interval > 0
    nan_policy: str = "stop"  # stop | skip (skip the step, count it in TensorBoard)
    # torch.compile the model's forward (and so its backward) where the layout allows: one process
    # or data parallelism with ZeRO 0-2; tensor/pipeline parallelism and ZeRO-3 stay eager (a warning
    # says so). The first steps pay the compilation.
    compile: bool = False


@dataclass
class ParallelConfig:
    tensor: int = ranged(1, ">= 1")  # megatron-core tensor-parallel size
    pipeline: int = ranged(1, ">= 1")  # pipeline stages over first / shared middle cycle / last
    zero_stage: int = ranged(1, "[0, 3]")  # DeepSpeed ZeRO stage over the data-parallel group (PP>1 allows only 1)
    sequence_parallel: bool = False
    microbatches: int = ranged(0, ">= 0")  # pipeline micro-batches per step; 0 = gradient-accumulation steps
    # none | recursion (checkpoint each recursion of the shared block) | full (also unique layers)
    activation_checkpointing: str = "none"
    # Optional explicit pipeline mapping: number of recursions held by each stage (one entry per
    # stage, summing to model.recursions) ...
    stage_recursions: Optional[List[int]] = ranged(None, ">= 0")
    # ... or of shared-layer passes (a recursion is as many passes as the block has layers; one entry
    # per stage, summing to recursions x block layers): a cut may then fall inside a recursion.
    stage_layers: Optional[List[int]] = ranged(None, ">= 0")


@dataclass
class CheckpointConfig:
    interval: int = ranged(500, ">= 1")  # optimizer steps between checkpoints
    keep_last: int = ranged(3, ">= 1")  # newest checkpoints kept
    resume: bool = True  # resume from run_dir/checkpoints/latest when present
    # A `mor export` folder whose weights start a NEW run (any parallel layout; optimizer, step and
    # data position start fresh). Ignored once the run has a checkpoint of its own to resume.
    init_from: Optional[str] = None
    # What a resume checks of a checkpoint's files before reading them: sha256 (every byte against the
    # checksum taken at save time), size (truncation only) or none. A damaged `latest` falls back to
    # the newest intact checkpoint.
    verify: str = "sha256"
    # Write checkpoints in the background: at the step boundary each rank's state is copied to host
    # memory (as much again as its shard of weights and optimizer state), then a thread writes it
    # while training goes on; atomicity, checksums and `latest` work as for a synchronous save, and a
    # new save first waits for the one in flight. (`async` itself is a Python keyword.)
    async_save: bool = False


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"  # holds checkpoints/, tensorboard/, config.yaml, logs
    log_interval: int = ranged(10, ">= 1")  # optimizer steps between log lines / scalars
    tensorboard: bool = True
    peak_tflops: Optional[float] = ranged(None, "> 0")  # per device, for MFU; unset: the GPU's dense bf16 peak
    # from a table (H100, H200, A100, L40S, MI300, B200), or on a CPU its measured fp32 matmul rate


@dataclass
class MoRConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
