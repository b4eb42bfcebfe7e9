"""Prepacked oneDNN weights for CPU serving give nn.Linear's results, never from a stale copy,
and step aside wherever a gradient is wanted."""

import pytest
import torch
from torch import nn

from mor_dist.inference.packed_linear import PackedWeight, available, pack_linears, unpack_linears

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN (mkldnn) linear")


def packed_model(bias: bool = True, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96, bias=bias), nn.SiLU(), nn.Linear(96, 32, bias=False)).to(dtype)


def plain(model, x):
    """The same modules through F.linear."""
    h = torch.nn.functional.linear(x, model[0].weight, model[0].bias)
    return torch.nn.functional.linear(torch.nn.functional.silu(h), model[2].weight)


@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 64), (1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_linear_fp32(shape, bias):
    model = packed_model(bias)
    assert pack_linears(model) == 2
    x = torch.randn(*shape)
    with torch.no_grad():
        got = model(x)
    assert model[0]._mor_packed.packed is not None, "the packed path was not taken"
    torch.testing.assert_close(got, plain(model, x), rtol=1e-5, atol=1e-5)


def test_packed_bf16():
    model = packed_model(True, torch.bfloat16)
    pack_linears(model)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), plain(model, x).float(), rtol=2e-2, atol=2e-2)


def test_updates_repack_and_gradients_bypass():
    model = packed_model()
    pack_linears(model)
    x = torch.randn(6, 64)
    with torch.no_grad():
        before = model(x)
    # Training through the packed modules: the plain path (autograd), then an optimizer step.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(x).square().mean()
    loss.backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(after, before), "a stale packed weight was read after the optimizer step"
    torch.testing.assert_close(after, plain(model, x), rtol=1e-5, atol=1e-5)
    # In-place edits (load_state_dict copies into the parameters) repack too.
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        assert model(x).abs().max() == 0
    # A dtype change makes new storage: repacked in the new dtype.
    model.to(torch.bfloat16)
    with torch.no_grad():
        assert model(x.bfloat16()).dtype == torch.bfloat16


def test_unpack_restores_plain_forward_and_state_dict_is_untouched():
    model = packed_model()
    keys = list(model.state_dict())
    pack_linears(model)
    assert pack_linears(model) == 2  # idempotent
    assert list(model.state_dict()) == keys and isinstance(model[0], nn.Linear)
    unpack_linears(model)
    assert "forward" not in model[0].__dict__ and "_mor_packed" not in model[0].__dict__


def layer_pair():
    """A transformer layer, and a packed copy of it."""
    from mor_dist.model.layers import RotaryEmbedding, TransformerLayer

    torch.manual_seed(0)
    make = lambda: TransformerLayer(64, 4, 2, 16, 96, 1e-5, RotaryEmbedding(16, 32, 10000.0))  # noqa: E731
    ref, packed = make(), make()
    packed.load_state_dict(ref.state_dict())
    pack_linears(packed)
    return ref, packed


def test_fused_projections_equal_separate_ones_and_follow_updates():
    from mor_dist.model.layers import TokenFrame

    ref, packed = layer_pair()
    x, pos = torch.randn(3, 5, 64), torch.arange(5).repeat(3, 1)
    with torch.no_grad():
        torch.testing.assert_close(packed(x, TokenFrame(pos)), ref(x, TokenFrame(pos)), rtol=1e-5, atol=1e-5)
        q, k, v = packed.attn.project_qkv(x)
        assert packed.attn._mor_fused.packed is not None, "the fused product was not taken"
        assert (q.shape[-1], k.shape[-1], v.shape[-1]) == (64, 32, 32)
        for got, lin in zip((q, k, v), (ref.attn.wq, ref.attn.wk, ref.attn.wv)):
            torch.testing.assert_close(got, lin(x), rtol=1e-5, atol=1e-5)
        gate, up = packed.mlp.project_gate_up(x)
        torch.testing.assert_close(gate, ref.mlp.w_gate(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(up, ref.mlp.w_up(x), rtol=1e-5, atol=1e-5)
        # A change of one of the stacked weights repacks the fused product; so does a new parameter.
        for layer in (ref, packed):
            layer.attn.wv.weight.mul_(3)
            layer.mlp.w_up.weight = nn.Parameter(layer.mlp.w_up.weight * 0.5)
        torch.testing.assert_close(packed(x, TokenFrame(pos)), ref(x, TokenFrame(pos)), rtol=1e-5, atol=1e-5)
    # Gradients wanted: the modules' own projections (autograd reaches every weight).
    packed(x, TokenFrame(pos)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in packed.named_parameters() if "norm" not in n)
    unpack_linears(packed)
    assert not any(k in packed.attn.__dict__ for k in ("_mor_fused", "project_qkv"))
    assert "project_gate_up" not in packed.mlp.__dict__


def test_tied_weight_holder():
    emb = nn.Embedding(50, 64)
    head = PackedWeight(emb.weight)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(head.linear(x), x @ emb.weight.t(), rtol=1e-5, atol=1e-5)
        emb.weight.mul_(2)
        torch.testing.assert_close(head.linear(x), x @ emb.weight.t(), rtol=1e-5, atol=1e-5)


def test_bench_script_runs(capsys):
    """bench/packed_linear.py at toy sizes: every path measured at every row count."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("packed_bench", "bench/packed_linear.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--json", "--d-model", "64", "--d-ff", "96", "--rows", "1", "8", "--rounds", "1",
                       "--seconds", "0.01", "--streamed-mib", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["rows"]) == {"1", "8"}
    assert all(r["linear"] > 0 and r["prepacked"] > 0 and r["prepacked_streamed"] > 0 for r in out["rows"].values())
    assert out["streamed_weights"] * 96 * 64 * 4 >= 2**20  # enough distinct weights for the MiB asked
