"""The train module's step bookkeeping (mor_dist/parallel/train_module.py)."""

from types import SimpleNamespace

import torch

from mor_dist.parallel.train_module import _accumulate


def test_step_sums_stay_on_the_losss_device():
    """The trainer's per-step sums (one torch.cat for the host copy) live where the loss does, even
    for a statistic handed over as a Python number; the meta device stands in for a GPU."""
    loss = torch.tensor(2.0, device="meta")
    out = SimpleNamespace(loss=loss, lm_loss=loss, aux={"balance": 0.5}, stats={"active_frac/r1": 0.25})
    sums = {}
    _accumulate(sums, out)
    _accumulate(sums, out)
    assert {k: v.device.type for k, v in sums.items()} == dict.fromkeys(
        ["loss", "lm_loss", "aux/balance", "stats/active_frac/r1"], "meta")
