"""Megatron-core tensor parallelism applied to a finished MoRModel, in place.

Each TransformerLayer (unique and shared) gets column-parallel Q/K/V and gate/up projections and
row-parallel output and down projections; the embedding becomes vocab-parallel and the tied head
computes vocab-parallel logits and loss. The full TP=1 weights are built first (same seed on every
rank) and each rank copies its shard, so TP=N starts exactly where TP=1 does.

Norms and routers stay replicated. Their inputs are replicated too (row-parallel outputs and the
embedding are all-reduced), so every TP rank makes bit-identical routing decisions, and their
gradients come out whole on every rank (column-parallel inputs all-reduce their gradient).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mor_dist.parallel import cpu_shim


class MegatronLinear(nn.Module):
    """A megatron parallel linear that returns only its output (they return (out, bias))."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0]


def init_megatron(tp: int, pp: int) -> None:
    """megatron-core's process groups, laid out as ParallelDims (tp fastest, then dp, then pp)."""
    from megatron.core import parallel_state

    cpu_shim.install()
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def _megatron_config(tp: int, dtype: torch.dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,  # the weights are overwritten with the TP=1 shards right away
        params_dtype=dtype,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


def _column(full: nn.Linear, config, rank: int, tp: int) -> MegatronLinear:
    from megatron.core.tensor_parallel import ColumnParallelLinear

    out_f, in_f = full.weight.shape
    layer = ColumnParallelLinear(
        in_f, out_f, config=config, init_method=nn.init.zeros_, bias=False, gather_output=False
    )
    with torch.no_grad():
        layer.weight.copy_(full.weight.chunk(tp, dim=0)[rank])
    return MegatronLinear(layer)


def _row(full: nn.Linear, config, rank: int, tp: int) -> MegatronLinear:
    from megatron.core.tensor_parallel import RowParallelLinear

    out_f, in_f = full.weight.shape
    layer = RowParallelLinear(
        in_f, out_f, config=config, init_method=nn.init.zeros_, bias=False, input_is_parallel=True,
        skip_bias_add=False,
    )
    with torch.no_grad():
        layer.weight.copy_(full.weight.chunk(tp, dim=1)[rank])
    return MegatronLinear(layer)


def _vocab_embedding(full: nn.Embedding, config, rank: int, tp: int) -> nn.Module:
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    vocab, dim = full.weight.shape
    emb = VocabParallelEmbedding(vocab, dim, init_method=nn.init.zeros_, config=config)
    with torch.no_grad():
        emb.weight.copy_(full.weight.chunk(tp, dim=0)[rank])
    return emb


def parallelize_layer(layer: nn.Module, config, rank: int, tp: int) -> None:
    """Swap one TransformerLayer's projections for megatron's parallel linears."""
    a, m = layer.attn, layer.mlp
    a.wq, a.wk, a.wv = (_column(w, config, rank, tp) for w in (a.wq, a.wk, a.wv))
    a.wo = _row(a.wo, config, rank, tp)
    m.w_gate, m.w_up = _column(m.w_gate, config, rank, tp), _column(m.w_up, config, rank, tp)
    m.w_down = _row(m.w_down, config, rank, tp)


def vocab_parallel_cross_entropy_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # megatron's kernel shifts its input in place: never hand it the logits the caller gets back.
    x = logits.float() if logits.dtype != torch.float32 else logits.clone()
    return vocab_parallel_cross_entropy(x, targets).mean()


def apply_tensor_parallel(model, tp: int, tp_rank: int) -> None:
    """Tensor-parallelize model in place over megatron's tensor-parallel group (init_megatron first)."""
    if tp == 1:
        return
    vocab = model.embed.weight.shape[0]
    if vocab % tp:
        raise ValueError(f"model.vocab_size={vocab} must be divisible by parallel.tensor={tp}")
    config = _megatron_config(tp, model.embed.weight.dtype)
    for layer in (*model.prefix, *model.shared, *model.suffix):
        parallelize_layer(layer, config, tp_rank, tp)
    model.embed = _vocab_embedding(model.embed, config, tp_rank, tp)
    if model.head is not None:
        model.head = _column(model.head, config, tp_rank, tp)

    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    def output_logits(h: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's vocabulary shard (B, T, V/tp)."""
        if model.head is not None:
            return model.head(h)
        # The replicated h feeds a vocab shard: its gradient must be summed over the TP ranks.
        return F.linear(copy_to_tensor_model_parallel_region(h), model.embed.weight)

    model.output_logits = output_logits
    model.lm_loss = vocab_parallel_cross_entropy_mean
