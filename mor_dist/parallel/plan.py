"""`mor plan`: per-rank memory of a parallel layout, estimated without allocating weights.

Parameters are counted on the meta device and assigned to pipeline stages as pipeline.py places them
(embedding on the first stage and, tied, on the last; the shared block on every stage that runs a
recursion; router r where recursion r runs); tensor-parallel weights are split by parallel.tensor.
Bytes per parameter (DeepSpeed with torch AdamW):
  parameters  2 (bf16, also train.dtype=auto) or 4 (fp32)   ZeRO-3: / dp
  gradients   same as parameters                  ZeRO-2/3: / dp
  optimizer   12 (fp32 master + exp_avg + exp_avg_sq; fp32 without ZeRO: 8, no master copy)
              ZeRO-1/2/3: / dp
Activations: bytes saved for backward per micro-batch, from a per-token count of what a Llama
layer's ops save (layer_activation_elems; split by TP, and by SP outside attention and the MLP),
with each recursion's tokens at its capacity, the routers, the head's input and the fp32
log-softmax (split by TP); activation checkpointing keeps only the region inputs plus one recomputed
region. Under 1F1B stage s holds up to (pipeline - s) micro-batches.
The tests check parameters, gradients, optimizer state and (without checkpointing) activations
against the bytes measured in real runs.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import torch

GIB = 1024**3
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1024, "mib": 1024**2, "gib": GIB, "tib": 1024**4}
# Framework buffers, allocator slack, communication buckets: reserved on top of the estimate.
OVERHEAD_FRACTION = 0.10


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"cannot read a size from {text!r}; give e.g. 80GiB, 40GB, 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class StageMemory:
    stage: int
    params: int  # elements held by one rank of this stage (before ZeRO-3 partitioning)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    # ZeRO-3's gathered parameters, communication buckets, the CUDA context and NCCL's buffers.
    other_bytes: int = 0

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes + self.other_bytes


def _tp_split(name: str) -> bool:
    """Weights tensor parallelism splits: projections of every layer, the embedding and the head."""
    return bool(re.search(r"\.(wq|wk|wv|wo|w_gate|w_up|w_down)\.weight$", name)) or name in ("embed.weight", "head.weight")


def stage_params(cfg) -> list[int]:
    """Parameter elements held by one rank of each pipeline stage."""
    from mor_dist.model import build_model
    from mor_dist.parallel.stages import stage_plan

    with torch.device("meta"):
        model = build_model(cfg)
    p = cfg.parallel
    pp, tp = p.pipeline, p.tensor
    lay = model.layout
    plan = stage_plan(cfg) if pp > 1 else [lay.recursions * lay.block]
    owner_of_pass = [s for s, n in enumerate(plan) for _ in range(n)]  # shared-layer pass -> stage
    counts = [0] * pp
    for name, w in model.named_parameters():
        n = w.numel() // tp if _tp_split(name) else w.numel()
        if name == "embed.weight":
            stages = {0, pp - 1} if model.head is None else {0}
        elif name.startswith(("prefix.", "token_router.")):
            stages = {0}
        elif name.startswith(("suffix.", "norm.", "head.")):
            stages = {pp - 1}
        elif name.startswith("shared."):
            stages = {s for s, k in enumerate(plan) if k}
        elif name.startswith("routers."):
            stages = {owner_of_pass[int(name.split(".")[1]) * lay.block]}  # the stage that routes it
        else:
            raise ValueError(f"plan does not know where parameter {name} lives")
        for s in stages:
            counts[s] += n
    return counts


def layer_activation_elems(m, tp: int, sp: bool, own_kv: bool = True) -> float:
    """Elements one token of one Llama layer saves for backward (as activation_bytes.py measures).

    Per norm its input and normalised value (2d) and its output, the input of the projections (d);
    Q (and K) before and after RoPE, V, the attention output and the output projection's input
    (3q + 2kv), the RoPE tables gathered at the token's position (hd per rotated tensor), the
    attention's log-sum-exp (one per head); SwiGLU's gate, up, activation and product (4 ff).
    Tensor parallelism splits the heads and the MLP; sequence parallelism also the norms, whose
    all-gathered outputs stay whole.
    """
    hd = m.head_dim or m.d_model // m.n_heads
    q, kv, d, h = m.n_heads * hd, m.n_kv_heads * hd, m.d_model, m.n_heads
    split = 3 * q + h + 4 * m.d_ff + (2 * kv if own_kv else 0)
    norms, rope = layer_fp32_elems(m, tp, sp, own_kv)
    return norms + 2 * d + split / tp + rope


def layer_fp32_elems(m, tp: int, sp: bool, own_kv: bool = True) -> tuple[float, float]:
    """Of layer_activation_elems, the ones kept in fp32 whatever the training dtype: RMSNorm works
    in fp32 (its input copy, the inverse RMS, the normalised value) and RoPE rotates fp32 copies
    with fp32 tables. Returns (norm elements, RoPE elements) per token."""
    hd = m.head_dim or m.d_model // m.n_heads
    norms = 2 * (2 * m.d_model + 1)
    return (norms / tp if sp else norms), (2 * hd if own_kv else hd)


def _activation_bytes(cfg, stage: int, plan: list[int], dp: int, elem: int) -> int:
    """plan: shared-layer passes per stage (stages.stage_plan)."""
    from mor_dist.model.accounting import step_token_fractions
    from mor_dist.model.layout import make_layout
    from mor_dist.parallel.stages import stage_spans

    m, p, rt = cfg.model, cfg.parallel, cfg.routing
    tp, pp = p.tensor, p.pipeline
    sp = p.sequence_parallel and tp > 1
    b, t = cfg.train.micro_batch_size, cfg.data.seq_len
    d = m.d_model

    def layer_bytes(own_kv: bool = True) -> float:
        """Bytes one token of one layer saves, its fp32 parts at 4 bytes."""
        f32 = sum(layer_fp32_elems(m, tp, sp, own_kv))
        return (layer_activation_elems(m, tp, sp, own_kv) - f32) * elem + f32 * 4

    per_layer = layer_bytes() / elem  # in units of `elem`, as the other counts below
    ckpt = p.activation_checkpointing
    lay = make_layout(m.n_layers, m.recursions, m.sharing, m.pad_layers)
    fracs = step_token_fractions(cfg)
    tokens = b * t
    units = 0.0  # elements saved for backward for one micro-batch on this stage
    regions = [0.0]  # a checkpointed region's activations, recomputed one at a time in backward
    extra = 0.0  # bytes kept in fp32 whatever the training dtype (the loss's log-softmax)

    def unique_layers(n: int) -> None:
        nonlocal units
        if ckpt == "full":
            units += n * tokens * d
            regions.append(per_layer * tokens)
        else:
            units += n * per_layer * tokens

    if stage == 0:
        unique_layers(lay.prefix)
        if rt.type == "token":  # the depth router's input and probabilities
            units += tokens * (d + 2 * lay.recursions)
    for r, lo, hi in stage_spans(plan, lay.block)[stage]:  # this stage's part of each recursion
        k = fracs[r] * tokens
        own_kv = cfg.kv.strategy != "share" or r == 0
        block = k * (per_layer if own_kv else layer_bytes(own_kv=False) / elem) * (hi - lo)
        if rt.type == "expert" and lo == 0:
            units += (fracs[r - 1] if r else 1.0) * tokens * d  # router input (the previous step's tokens)
        if rt.type == "expert" and hi == lay.block:
            units += k * d + 3 * k  # gated update's output and gate
        elif rt.type == "token" and r == lay.recursions - 1 and hi == lay.block:
            units += tokens * (d + 2)  # final gate * run
        if ckpt in ("recursion", "full"):
            units += k * d
            regions.append(block)
        else:
            units += block
    if stage == pp - 1:
        unique_layers(lay.suffix)
        units += tokens * (3 * d + 1)  # final norm, the head's input
        extra += tokens * 4 * m.vocab_size / tp  # log-softmax of this rank's vocabulary, fp32
    in_flight = min(pp - stage, max(1, cfg.train.global_batch_size // (b * dp))) if pp > 1 else 1
    return int((units * elem + extra) * in_flight + max(regions) * elem)


def estimate(cfg, gpus: int) -> tuple[list[StageMemory], int]:
    """Per-stage memory of one rank, and the data-parallel size, for `gpus` ranks."""
    from mor_dist.parallel.parallelize import check_layout
    from mor_dist.parallel.stages import stage_plan

    p = cfg.parallel
    check_layout(cfg)
    if gpus % (p.tensor * p.pipeline):
        from mor_dist.config import ConfigError

        raise ConfigError(f"--gpus: {gpus} is not divisible by parallel.tensor={p.tensor} x parallel.pipeline="
                          f"{p.pipeline}; give a multiple of {p.tensor * p.pipeline}")
    dp = gpus // (p.tensor * p.pipeline)
    # A plan is for GPU ranks: train.dtype=auto means bf16 there, whatever machine plans it.
    elem = 4 if cfg.train.dtype == "fp32" else 2
    zero = p.zero_stage
    if p.pipeline > 1:
        plan = stage_plan(cfg)
    else:
        from mor_dist.model.layout import make_layout

        m = cfg.model
        lay = make_layout(m.n_layers, m.recursions, m.sharing, m.pad_layers)
        plan = [lay.recursions * lay.block]
    out = []
    for s, n in enumerate(stage_params(cfg)):
        params = n * elem // (dp if zero >= 3 else 1)
        # bf16 under ZeRO accumulates gradients in fp32 (engine.deepspeed_config).
        grad_elem = 4 if elem == 2 and zero >= 1 else elem
        grads = n * grad_elem // (dp if zero >= 2 else 1)
        opt_per = 8 if (zero == 0 and elem == 4) else 12
        optim = n * opt_per // (dp if zero >= 1 else 1)
        out.append(StageMemory(s, n, params, grads, optim, _activation_bytes(cfg, s, plan, dp, elem),
                               _other_bytes(cfg, zero, elem, last=s == p.pipeline - 1)))
    return out, dp


# The CUDA context, cuBLAS workspaces and NCCL's buffers per GPU rank: an allowance (typically
# 0.5-1 GiB; measure with torch.cuda.mem_get_info before and after init on your cluster).
CONTEXT_BYTES = GIB


def _other_bytes(cfg, zero: int, elem: int, last: bool) -> int:
    """ZeRO-3 gathers a whole layer's parameters for its forward and backward, plus its prefetch
    bucket; ZeRO's reduce and all-gather buckets stage fp32 gradients (engine.zero_config sizes
    them d_model^2); the loss's fp32 gradient of the logits exists at the start of the backward (last
    stage); a GPU process holds its CUDA context."""
    m, p = cfg.model, cfg.parallel
    bucket = m.d_model * m.d_model
    hd = m.head_dim or m.d_model // m.n_heads
    layer = (2 * m.n_heads * hd + 2 * m.n_kv_heads * hd) * m.d_model + 3 * m.d_model * m.d_ff
    out = CONTEXT_BYTES
    if last:
        out += cfg.train.micro_batch_size * cfg.data.seq_len * 4 * m.vocab_size // p.tensor
    if zero >= 1:
        out += 2 * bucket * 4
    if zero >= 3:
        out += (layer // p.tensor + int(0.9 * bucket)) * elem
    return out


def _fmt(n: float) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:8.2f} MiB"


def run_plan(args) -> int:
    """Print the estimate; exit code 0 when every rank fits in --gpu-mem, 1 when not."""
    from mor_dist.config import load_config

    cfg = load_config(args.config, args.overrides)
    budget = args.gpu_mem
    stages, dp = estimate(cfg, args.gpus)
    p = cfg.parallel
    sp = " (sequence parallel)" if p.sequence_parallel else ""
    print(f"layout: {args.gpus} GPUs = tensor {p.tensor}{sp} x data {dp} x pipeline {p.pipeline}, ZeRO-{p.zero_stage}, "
          f"activation checkpointing {p.activation_checkpointing}, micro-batch {cfg.train.micro_batch_size} x "
          f"{cfg.data.seq_len} tokens")
    print(f"{'stage':>5} {'params/rank':>12} {'parameters':>12} {'gradients':>12} {'optimizer':>12} "
          f"{'activations':>12} {'other':>12} {'total':>12}")
    for s in stages:
        print(f"{s.stage:>5} {s.params:>12,} {_fmt(s.param_bytes):>12} {_fmt(s.grad_bytes):>12} "
              f"{_fmt(s.optimizer_bytes):>12} {_fmt(s.activation_bytes):>12} {_fmt(s.other_bytes):>12} "
              f"{_fmt(s.total):>12}")
    print("other = ZeRO-3's gathered layer and prefetch bucket, ZeRO's communication buckets, and a "
          f"{CONTEXT_BYTES / GIB:.0f} GiB allowance for the CUDA context and NCCL")
    if p.pipeline > 1:
        from mor_dist.parallel.stages import describe_plan, stage_flops, stage_plan

        plan = stage_plan(cfg)
        flops = stage_flops(cfg, plan)
        print(f"pipeline plan (shared-layer passes per stage): {plan} = {describe_plan(cfg, plan)}")
        print("training GFLOPs per token by stage: " + ", ".join(f"{f / 1e9:.3f}" for f in flops)
              + f"; slowest / mean = {max(flops) / (sum(flops) / len(flops)):.2f}")
    peak = max(s.total for s in stages) * (1 + OVERHEAD_FRACTION)
    fits = peak <= budget
    print(f"peak per rank with {OVERHEAD_FRACTION:.0%} overhead: {_fmt(peak).strip()} of {_fmt(budget).strip()}: "
          f"{'fits' if fits else 'does NOT fit'}")
    return 0 if fits else 1


def add_plan_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="per-rank memory of a parallel layout (no weights allocated); exit 1 if it does not fit",
    )
    p.add_argument("config", help="YAML config, e.g. configs/paper/1.7b/mor_nr3.yaml")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. parallel.tensor=2 parallel.zero_stage=2")
    from mor_dist.config import flag_type

    p.add_argument("--gpus", type=flag_type(">= 1"), required=True, help="total ranks (tensor x data x pipeline)")
    p.add_argument("--gpu-mem", type=parse_bytes, default="80GiB", help="memory per GPU, e.g. 80GiB (default), 40GB")
    p.set_defaults(func=run_plan)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mor")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
