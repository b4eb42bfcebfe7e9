"""parallelize(model, cfg, dims): apply the layout's parallelism to a finished MoRModel, in order:
tensor parallelism (megatron-core, with sequence parallelism as an option: sequence_parallel.py),
then activation checkpointing, then torch.compile where the layout allows (compile.py). Data
parallelism and ZeRO come
with the DeepSpeed engine (train_module.py); pipeline stages with pipeline.py.

check_layout(cfg) rejects layouts this package cannot run; it needs no process group, so launchers
can call it before any process starts.
"""

from __future__ import annotations

from mor_dist.parallel.dims import ParallelLayoutError


def check_layout(cfg) -> None:
    p, m = cfg.parallel, cfg.model
    if p.pipeline > 1 and p.zero_stage > 1:
        raise ParallelLayoutError(
            f"parallel.zero_stage={p.zero_stage} cannot combine with parallel.pipeline={p.pipeline}: "
            "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"
        )
    if p.sequence_parallel and p.tensor == 1:
        raise ParallelLayoutError(
            "parallel.sequence_parallel=true needs parallel.tensor > 1: it shards activations over the "
            "tensor-parallel group"
        )
    if m.vocab_size % p.tensor:
        raise ParallelLayoutError(f"model.vocab_size={m.vocab_size} must be divisible by parallel.tensor={p.tensor}")
    if p.pipeline > 1:
        from mor_dist.parallel.stages import stage_plan

        stage_plan(cfg)  # raises on a mapping it cannot run


def parallelize(model, cfg, dims) -> None:
    check_layout(cfg)
    if dims.tp > 1:
        from mor_dist.parallel.tensor_parallel import apply_tensor_parallel, init_megatron

        init_megatron(dims.tp, dims.pp)
        apply_tensor_parallel(model, dims.tp, dims.tp_rank, cfg.parallel.sequence_parallel)
    if cfg.parallel.activation_checkpointing != "none":
        from mor_dist.parallel.activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    if cfg.train.compile:
        from mor_dist.parallel.compile import apply_compile

        apply_compile(model, cfg, dims)
