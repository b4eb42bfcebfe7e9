"""Activation checkpointing: same gradients, fewer saved activations (one process)."""

from __future__ import annotations

import pytest
import torch

from mor_dist.parallel.activation_checkpoint import apply_activation_checkpointing
from tests.parallel.common import config, model_for, step_batches


def _grads_and_saved_bytes(name, mode):
    cfg = config(name)
    model = model_for(cfg)
    apply_activation_checkpointing(model, mode)
    tokens, targets = step_batches(cfg, 0)[0]
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, targets).loss
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, saved[0]


@pytest.mark.parametrize("name", ["mor", "mor_kvshare", "mor_token"])
def test_checkpointing_keeps_gradients_and_saves_memory(name):
    ref, ref_bytes = _grads_and_saved_bytes(name, "none")
    rec, rec_bytes = _grads_and_saved_bytes(name, "recursion")
    full, full_bytes = _grads_and_saved_bytes(name, "full")
    assert sorted(rec) == sorted(ref) == sorted(full)
    for n in ref:
        torch.testing.assert_close(rec[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(full[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    # Bytes saved for backward during the forward (recomputed ones are not counted here).
    assert rec_bytes < 0.7 * ref_bytes
    assert full_bytes < rec_bytes
    print(f"\n{name}: saved activations none {ref_bytes} / recursion {rec_bytes} / full {full_bytes} bytes")
