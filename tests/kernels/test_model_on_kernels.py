"""The MoR model's attention on the Triton kernels: a training forward + backward and a causal-mode
(inference-decision, padded) forward give what the torch path gives. On a GPU this is the model's
default route ("auto"); on CPU the kernels run under Triton's interpreter (see conftest.py)."""

import pytest
import torch

from mor_dist.config import load_config
from mor_dist.kernels import attention_backend
from mor_dist.model import build_model

SMALL = ["model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=128", "model.n_layers=4",
         "model.recursions=2", "model.vocab_size=256", "data.seq_len=24", "train.dtype=fp32"]


def _run(cfg, device, backend, mode):
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    with attention_backend(backend):
        out = model(tokens, tokens, mode=mode)
        out.loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().cpu(), out.depth.cpu(), grads


@pytest.mark.parametrize("name", ["mor", "mor_kvshare", "mor_token"])
@pytest.mark.parametrize("mode", ["topk", "causal"])
def test_model_on_triton_matches_torch(device, name, mode):
    cfg = load_config(f"configs/tiny/{name}.yaml", SMALL)
    loss, depth, grads = _run(cfg, device, "triton", mode)
    want_loss, want_depth, want_grads = _run(cfg, device, "torch", mode)
    assert torch.equal(depth, want_depth)  # same routing: the attention outputs agree closely enough
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert sorted(grads) == sorted(want_grads)
    for key in want_grads:
        torch.testing.assert_close(grads[key], want_grads[key], atol=1e-5, rtol=1e-4, msg=key)
