"""Megatron-core tensor parallelism applied to a finished MoRModel, in place.

Each TransformerLayer (unique and shared) gets column-parallel Q/K/V and gate/up projections and
row-parallel output and down projections; the embedding becomes vocab-parallel and the tied head
computes vocab-parallel logits and loss. The full TP=1 weights are built first (same seed on every
rank) and each rank copies its shard, so TP=N starts exactly where TP=1 does.

The norm in front of each attention and MLP (ParallelInputNorm) is where activations enter the
tensor-parallel region, once for all projections it feeds: without sequence parallelism its output
all-reduces its gradient (megatron's copy-to-region); with it (sequence_parallel.py) its input is this
rank's share of the tokens and its output is all-gathered over the group. The column-parallel
projections behind it then do no communication of their own.

Routers and the final norm stay replicated. Their inputs are replicated too (row-parallel outputs, the
embedding and the sequence-parallel spans all end in a reduction or gather), so every TP rank makes
bit-identical routing decisions, and their gradients come out whole on every rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mor_dist.model.layers import RMSNorm, rms_norm
from mor_dist.parallel import cpu_shim


class MegatronLinear(nn.Module):
    """A megatron parallel linear that returns only its output (they return (out, bias)).

    seq_first: megatron's sequence-parallel communication runs along dim 0 ([s, b, h]); the model is
    batch-first, so the tokens dim is moved to the front around the call (a view; free at batch 1).
    """

    def __init__(self, inner: nn.Module, seq_first: bool = False):
        super().__init__()
        self.inner = inner
        self.seq_first = seq_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seq_first:
            return self.inner(x.transpose(0, 1))[0].transpose(0, 1)
        return self.inner(x)[0]


class ParallelInputNorm(RMSNorm):
    """RMSNorm whose output feeds column-parallel projections (attn_norm, mlp_norm).

    Tensor parallelism: the output is copied into the TP region (backward: one all-reduce of the
    summed input gradients of Q, K and V, or of gate and up). Sequence parallelism: the input holds
    this rank's tokens; the weight's gradient is summed over the ranks' tokens, and the output is
    all-gathered along the tokens (backward: reduce-scatter), once for every projection behind it.
    Same parameter name as RMSNorm, so checkpoints do not depend on the layout.
    """

    def __init__(self, norm: RMSNorm, sequence_parallel: bool):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight  # the same Parameter: device, dtype and values unchanged
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        if not self.sequence_parallel:
            return copy_to_tensor_model_parallel_region(rms_norm(x, self.weight, self.eps))
        from mor_dist.parallel.sequence_parallel import gather_tokens

        y = rms_norm(x, copy_to_tensor_model_parallel_region(self.weight), self.eps)
        return gather_tokens(y, tensor_parallel_output_grad=True)


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


def _megatron_config(tp: int, dtype: torch.dtype, sequence_parallel: bool = False):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,  # the weights are overwritten with the TP=1 shards right away
        params_dtype=dtype,
        sequence_parallel=sequence_parallel,
        gradient_accumulation_fusion=False,
    )


def _copy_shard(layer: nn.Module, full: torch.Tensor, dim: int, rank: int, tp: int) -> None:
    with torch.no_grad():
        layer.weight.copy_(full.chunk(tp, dim=dim)[rank])


def _column(full: nn.Linear, config, rank: int, tp: int, after_norm: bool = False) -> MegatronLinear:
    from megatron.core.tensor_parallel import ColumnParallelLinear

    out_f, in_f = full.weight.shape
    layer = ColumnParallelLinear(
        in_f, out_f, config=config, init_method=nn.init.zeros_, bias=False, gather_output=False,
        # Behind a ParallelInputNorm the input is already in the TP region (its gradient is reduced there).
        disable_grad_reduce=after_norm,
    )
    _copy_shard(layer, full.weight, 0, rank, tp)
    return MegatronLinear(layer)


def _row(full: nn.Linear, config, rank: int, tp: int) -> MegatronLinear:
    """Row-parallel: all-reduces its output, or reduce-scatters it along the tokens when
    config.sequence_parallel (megatron's column-parallel layers would then all-gather their input
    themselves, once per projection: they get a config without it)."""
    from megatron.core.tensor_parallel import RowParallelLinear

    out_f, in_f = full.weight.shape
    layer = RowParallelLinear(
        in_f, out_f, config=config, init_method=nn.init.zeros_, bias=False, input_is_parallel=True,
        skip_bias_add=False,
    )
    _copy_shard(layer, full.weight, 1, rank, tp)
    return MegatronLinear(layer, seq_first=config.sequence_parallel)


def _vocab_embedding(full: nn.Embedding, config, rank: int, tp: int) -> nn.Module:
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    vocab, dim = full.weight.shape
    emb = VocabParallelEmbedding(vocab, dim, init_method=nn.init.zeros_, config=config)
    _copy_shard(emb, full.weight, 0, rank, tp)
    return emb


def parallelize_layer(layer: nn.Module, config, row_config, rank: int, tp: int) -> None:
    """Swap one TransformerLayer's norms and projections for their tensor-parallel versions."""
    a, m, sp = layer.attn, layer.mlp, row_config.sequence_parallel
    layer.attn_norm = ParallelInputNorm(layer.attn_norm, sp)
    layer.mlp_norm = ParallelInputNorm(layer.mlp_norm, sp)
    a.wq, a.wk, a.wv = (_column(w, config, rank, tp, after_norm=True) for w in (a.wq, a.wk, a.wv))
    a.wo = _row(a.wo, row_config, rank, tp)
    m.w_gate, m.w_up = (_column(w, config, rank, tp, after_norm=True) for w in (m.w_gate, m.w_up))
    m.w_down = _row(m.w_down, row_config, rank, tp)


def vocab_parallel_cross_entropy_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # megatron's kernel shifts its input in place: never hand it the logits the caller gets back.
    x = logits.float() if logits.dtype != torch.float32 else logits.clone()
    return vocab_parallel_cross_entropy(x, targets).mean()


def apply_tensor_parallel(model, tp: int, tp_rank: int, sequence_parallel: bool = False) -> None:
    """Tensor-parallelize model in place over megatron's tensor-parallel group (init_megatron first);
    with sequence_parallel, the layers' norms and residuals also hold only this rank's tokens."""
    if tp == 1:
        return
    vocab = model.embed.weight.shape[0]
    if vocab % tp:
        raise ValueError(f"model.vocab_size={vocab} must be divisible by parallel.tensor={tp}")
    dtype = model.embed.weight.dtype
    config, row_config = _megatron_config(tp, dtype), _megatron_config(tp, dtype, sequence_parallel)
    for layer in (*model.prefix, *model.shared, *model.suffix):
        parallelize_layer(layer, config, row_config, tp_rank, tp)
    # The embedding and the head run outside the layer spans, on replicated activations.
    model.embed = _vocab_embedding(model.embed, config, tp_rank, tp)
    if model.head is not None:
        model.head = _column(model.head, config, tp_rank, tp)
    if sequence_parallel:
        from mor_dist.parallel.sequence_parallel import apply_sequence_parallel

        apply_sequence_parallel(model, tp)

    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    def output_logits(h: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's vocabulary shard (B, T, V/tp)."""
        if model.head is not None:
            return model.head(h)
        # The replicated h feeds a vocab shard: its gradient must be summed over the TP ranks.
        return F.linear(copy_to_tensor_model_parallel_region(h), model.embed.weight)

    model.output_logits = output_logits
    model.lm_loss = vocab_parallel_cross_entropy_mean
