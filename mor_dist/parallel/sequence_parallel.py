"""Sequence parallelism for MoR (parallel.sequence_parallel=true, with parallel.tensor > 1).

Megatron's sequence parallelism shards the activations outside attention and the MLP (norms,
residual adds) along the tokens over the tensor-parallel group. MoR adds a constraint: expert-choice
top-k ranks the tokens of a whole sequence, and the shared block runs on the gathered active tokens.
So the residual stream BETWEEN layer spans stays replicated, and routing is unchanged (identical on
every rank), while INSIDE each span of layers -- the unique first layers, one recursion of the shared
block over its active tokens, the unique last layers -- each rank holds 1/tp of the span's tokens:

    span input (B, K, d), replicated
      -> pad K to a multiple of tp (padding slots are invalid keys), keep this rank's K/tp tokens
      -> per layer: ParallelInputNorm on K/tp tokens, all-gather -> attention / MLP on all K tokens
         with this rank's heads / hidden units -> row-parallel reduce-scatter back to K/tp tokens
      -> all-gather the span output, drop the padding: (B, K, d), replicated again

Entering a span costs nothing (every rank already has the tokens); leaving costs one all-gather of
the span output, on top of megatron's all-gather + reduce-scatter pair per attention and per MLP.
The communication runs on megatron-core's sequence-parallel mappings, which work along dim 0; the
model is batch-first, so the tokens dim is moved to the front around them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


def split_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) replicated -> (B, K/tp, ...): this rank's tokens. Backward: all-gather."""
    from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

    return scatter_to_sequence_parallel_region(x.transpose(0, 1)).transpose(0, 1)


def gather_tokens(x: torch.Tensor, tensor_parallel_output_grad: bool) -> torch.Tensor:
    """(B, K/tp, ...) -> (B, K, ...) on every rank.

    tensor_parallel_output_grad: the gathered tensor feeds tensor-parallel work (each rank's gradient
    is a partial sum: backward reduce-scatters) rather than replicated work (backward keeps this
    rank's slice of the identical gradients).
    """
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    out = gather_from_sequence_parallel_region(
        x.transpose(0, 1), tensor_parallel_output_grad=tensor_parallel_output_grad
    )
    return out.transpose(0, 1)


def pad_frame(frame, k: int, pad: int):
    """The span's TokenFrame with `pad` invalid slots appended (positions repeat the last one, so
    valid slots stay ascending)."""
    b = frame.pos.shape[0]
    pos = torch.cat([frame.pos, frame.pos[:, -1:].expand(b, pad)], dim=1)
    valid = frame.valid if frame.valid is not None else frame.pos.new_ones((b, k), dtype=torch.bool)
    valid = F.pad(valid, (0, pad), value=False)
    return dataclasses.replace(frame, pos=pos, valid=valid)


def apply_sequence_parallel(model, tp: int) -> None:
    """Make every span of layers run sequence-parallel (after apply_tensor_parallel set up the layers)."""
    run_layers = model.run_layers  # the model's own loop over a span

    def sequence_parallel_run_layers(layers, x, frame, keys=None):
        if len(layers) == 0 or x.shape[1] == 0:
            return run_layers(layers, x, frame, keys)
        k = x.shape[1]
        pad = -k % tp
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            frame = pad_frame(frame, k, pad)
        out = run_layers(layers, split_tokens(x), frame, keys)
        # Everything after the span (routing, scatter into the residual stream) is replicated work.
        return gather_tokens(out, tensor_parallel_output_grad=False)[:, :k]

    model.run_layers = sequence_parallel_run_layers
