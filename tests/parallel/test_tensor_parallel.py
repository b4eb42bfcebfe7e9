"""TP=2 (megatron-core parallel layers over gloo) against the single-process model."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.common import config, reference_eval, reference_grads, reference_losses
from tests.parallel.conftest import TP_CASES


@pytest.mark.parametrize("case", TP_CASES, ids=lambda c: "-".join((c[0], *c[1])))
def test_tp2_equals_tp1(world2, case):
    name, overrides = case
    cfg = config(name, overrides)
    ranks = [r["tp_cases"][case] for r in world2]
    ref = reference_losses(cfg)
    for r in ranks:
        assert r["losses"] == pytest.approx(ref, abs=1e-5)
    assert ref[-1] < ref[0] - 0.5, "the reference does not learn: the comparison would be vacuous"

    # Routers replicated: every TP rank routed every token to the same depth.
    assert torch.equal(ranks[0]["depth"], ranks[1]["depth"])

    # Inference routing (causal decisions, padded gathers): same loss and depths as one process.
    want_loss, want_depth = reference_eval(cfg)
    for r in ranks:
        assert r["eval"][0] == pytest.approx(want_loss, abs=1e-5)
        assert torch.equal(r["eval"][1], want_depth)
    assert 0 < int(want_depth.sum()) < want_depth.numel() * cfg.model.recursions, "causal routing kept all or none"

    # Every gradient (shared block, unique layers, routers, embedding, norms), gathered over the TP
    # group, equals the single-process one.
    want = reference_grads(cfg, prefix="")
    got = ranks[0]["grads"]
    assert sorted(got) == sorted(want) and any(k.startswith("routers.") or k.startswith("token_router.") for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def test_sequence_parallel_shards_activations(world2):
    """Same numbers as plain TP (above), but each rank saves fewer activation bytes for backward:
    the norms' inputs and the residual stream inside every span hold half of the tokens."""
    sp = ("mor", ("parallel.sequence_parallel=true",))
    tp = ("mor", ())
    for r in world2:
        with_sp, without = r["tp_cases"][sp]["activation_bytes"], r["tp_cases"][tp]["activation_bytes"]
        print(f"activation bytes per rank: TP=2 {without:,}, TP=2+SP {with_sp:,} ({with_sp / without:.2f}x)")
        assert with_sp < 0.95 * without


def test_sequence_parallel_needs_tensor_parallel():
    from mor_dist.parallel.dims import ParallelLayoutError
    from mor_dist.parallel.parallelize import check_layout

    check_layout(config("mor", ["parallel.tensor=2", "parallel.sequence_parallel=true"]))
    with pytest.raises(ParallelLayoutError, match="parallel.sequence_parallel=true needs parallel.tensor > 1"):
        check_layout(config("mor", ["parallel.sequence_parallel=true"]))
