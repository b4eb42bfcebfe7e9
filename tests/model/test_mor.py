"""The MoR forward: equivalences, causality, gradients, routing state."""

import pytest
import torch

from mor_dist.config import load_config
from mor_dist.model import build_model
from mor_dist.model.layers import TokenFrame
from tests.model.reference import reference_forward

TINY = "configs/tiny/{}.yaml"
VOCAB = 4096


def make(name, overrides=(), seed=0):
    torch.manual_seed(seed)
    return build_model(load_config(TINY.format(name), list(overrides)))


def tokens(b=2, t=48, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv", ["recursion_wise", "share"])
def test_capacity_one_equals_recursive(kv):
    """With every token selected at every step, MoR's gather/scatter path is the recursive model."""
    rec = make("recursive", [f"kv.strategy={kv}"])
    mor = make("mor", [f"kv.strategy={kv}", "routing.capacity=[1.0,1.0,1.0]", "routing.gating=none"], seed=5)
    missing, unexpected = mor.load_state_dict(rec.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("routers.") for k in missing)
    x = tokens()
    torch.testing.assert_close(mor(x, mode="topk").logits, rec(x).logits, rtol=0, atol=1e-5)

    # The paper's weighted update at capacity 1: H + g * f(H) with the recursive model's block.
    mor_w = make("mor", [f"kv.strategy={kv}", "routing.capacity=[1.0,1.0,1.0]"], seed=5)
    mor_w.load_state_dict(rec.state_dict(), strict=False)
    state = rec.begin(x, "topk")
    for r in range(3):
        g = mor_w.alpha * torch.sigmoid(mor_w.routers[r](state.h)).unsqueeze(-1)
        frame = rec._frame(r, state.pos, None, state)
        state.h = state.h + g * rec._run_block(r, state.h, frame)
    torch.testing.assert_close(mor_w(x, mode="topk").logits, rec.finish(state).logits, rtol=0, atol=1e-5)


CASES = [
    ("mor", []),
    ("mor", ["routing.router=mlp", "routing.capacity=[0.75,0.5,0.25]"]),
    ("mor_kvshare", []),
    ("mor", ["routing.causal_method=aux_router"]),
    ("mor_token", []),
    ("mor_token", ["kv.strategy=share", "routing.token_func=sigmoid"]),
    ("recursive", []),
    ("recursive", ["kv.strategy=share"]),
]


@pytest.mark.parametrize("mode", ["topk", "causal"])
@pytest.mark.parametrize("name, overrides", CASES)
def test_gather_scatter_equals_masked_dense_reference(name, overrides, mode):
    model = make(name, overrides)
    if mode == "causal":
        # Random routers drop about half the tokens at step 1; bias them so several depths occur.
        for router in model.routers:
            for p in router.parameters():
                p.data.add_(0.01)
    x = tokens()
    with torch.no_grad():
        got = model(x, mode=mode)
        want = reference_forward(model, x, mode)
    torch.testing.assert_close(got.logits, want, rtol=0, atol=2e-5)
    assert got.depth.max() > got.depth.min() or name == "recursive"


@pytest.mark.parametrize("name, overrides", CASES)
def test_causal_mode_ignores_later_tokens(name, overrides):
    model = make(name, overrides).eval()
    x = tokens(t=64)
    x2 = x.clone()
    x2[:, 40:] = tokens(t=24, seed=7)
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a.logits[:, :40], b.logits[:, :40], rtol=0, atol=1e-5)
    assert torch.equal(a.depth[:, :40], b.depth[:, :40])


def test_topk_mode_is_not_causal():
    """Top-k over a whole sequence uses the future: the reason the causal mode exists. Also shows the
    causality test above can fail."""
    model = make("mor").train()
    x = tokens(t=64)
    x2 = x.clone()
    x2[:, 40:] = tokens(t=24, seed=7)
    with torch.no_grad():
        a, b = model(x, mode="topk"), model(x2, mode="topk")
    assert not torch.allclose(a.logits[:, :40], b.logits[:, :40], atol=1e-5)


@pytest.mark.parametrize(
    "name, overrides",
    [("mor", []), ("mor", ["routing.causal_method=aux_router"]), ("mor", ["routing.gating=none"]),
     ("mor_token", []), ("mor_kvshare", ["routing.z_loss_coef=0.001"])],
)
def test_routers_get_gradients(name, overrides):
    model = make(name, overrides).train()
    x = tokens()
    out = model(x, targets=tokens(seed=3))
    assert out.aux and torch.isfinite(out.loss)
    out.loss.backward()
    routers = list(model.routers.parameters()) + list(model.token_router.parameters() if model.token_router else [])
    assert routers
    for p in routers:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    for p in model.shared.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def _load_imbalance(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    loads = torch.stack([out.stats[f"depth_load/d{i}"] for i in (1, 2, 3)])
    return (loads - 1 / 3).abs().max().item()


def _skewed_token_model(overrides):
    model = make("mor_token", overrides)
    with torch.no_grad():  # favour depth 1 for most tokens
        model.token_router.net.weight.zero_()
        model.token_router.net.weight[0] += 0.05
    return model


def test_token_choice_balancing_loss_moves_loads_toward_uniform():
    model = _skewed_token_model(["routing.balancing=loss", "routing.balance_coef=1.0"])
    x, y = tokens(b=4, t=64), tokens(b=4, t=64, seed=9)
    before = _load_imbalance(model, x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        model.train()
        out = model(x, targets=y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.after_optimizer_step()
    after = _load_imbalance(model, x)
    assert before > 0.3 and after < before / 3, (before, after)


def test_token_choice_loss_free_bias_moves_loads_toward_uniform():
    """The bias alone (router weights fixed) rebalances: b_i += rate * sign(mean_load - load_i)."""
    model = make("mor_token", ["routing.balancing=loss_free", "routing.bias_update_rate=0.005"])
    x = tokens(b=4, t=64)
    with torch.no_grad():  # spread the logits across tokens, then favour depth 1 on average
        h1 = model.begin(x, "causal").h1.mean((0, 1))
        model.token_router.net.weight.mul_(10)
        model.token_router.net.weight[0] += 0.3 * h1 / h1.norm() ** 2
    before = _load_imbalance(model, x)
    history = []
    for _ in range(60):
        model.train()
        with torch.no_grad():
            model(x, mode="topk")
        model.after_optimizer_step()
        history.append(_load_imbalance(model, x))
    assert before > 0.3 and max(history[-10:]) < before / 3, (before, history[-10:])
    assert model.token_router.bias[0] < 0 < model.token_router.bias[2]
    assert model.token_router.pending_load.sum() == 0  # consumed by the update


def test_routing_state_lives_in_the_state_dict():
    model = make("mor_token", ["routing.balancing=loss_free", "routing.max_depth_warmup_steps=2"]).train()
    out = model(tokens(), targets=tokens(seed=2))
    assert (out.depth == 3).all()  # max-depth warmup forces the deepest recursion
    model.after_optimizer_step()
    model.after_optimizer_step()
    sd = model.state_dict()
    assert int(sd["train_step"]) == 2 and "token_router.bias" in sd
    fresh = make("mor_token", ["routing.balancing=loss_free", "routing.max_depth_warmup_steps=2"])
    fresh.load_state_dict(sd)
    assert int(fresh.train_step) == 2 and torch.equal(fresh.token_router.bias, model.token_router.bias)
    fresh.train()
    assert not (fresh(tokens(), targets=tokens(seed=2)).depth == 3).all()  # warmup is over


def test_capacity_warmup_follows_saved_step():
    model = make("mor", ["routing.capacity_warmup_steps=10"]).train()
    x = tokens(t=60)
    frac = lambda: model(x, mode="topk").stats["active_frac/r3"].item()  # noqa: E731
    assert frac() == pytest.approx(1.0)  # step 0: warmup starts at capacity 1
    # A checkpoint saved at step 10 (the forward reads the host's copy, which follows the load).
    model.load_state_dict({**model.state_dict(), "train_step": torch.tensor(10)})
    assert model.host_step == 10
    assert frac() == pytest.approx(int(60 / 3) / 60)


def test_shared_block_is_one_set_of_parameters():
    model = make("mor")
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.startswith("shared.") for n in names) == 2 * 9  # B=2 layers, 9 tensors each
    frame_calls = []
    hook = model.shared[0].register_forward_pre_hook(lambda m, a: frame_calls.append(a[1].pos.shape[1]))
    model(tokens(t=60), mode="topk")
    hook.remove()
    assert frame_calls == [60, 40, 20]  # one module, applied at shrinking token counts: compute shrinks
    assert isinstance(TokenFrame(torch.zeros(1, 1, dtype=torch.long)).kv_store, dict)


@pytest.mark.parametrize("func", ["softmax", "sigmoid"])
def test_token_choice_balance_loss_is_the_authors(func):
    """0.1 * sum_i f_i P_i, P_i the mean of the gate-scaled router probability (alpha * p), as in the
    authors' code: with the sigmoid router (alpha 0.1) that is a tenth of using p itself."""
    model = make("mor_token", [f"routing.token_func={func}"]).train()
    x = tokens()
    h = model.run_layers(model.prefix, model.embed(x), TokenFrame(torch.arange(x.shape[1]).expand(x.shape)))
    _, probs = model.token_router.probs(h)
    nr = model.layout.recursions
    choice = probs.argmax(-1)
    f = nr * torch.stack([(choice == i).float().mean() for i in range(nr)])
    want = 0.1 * (f * probs.flatten(0, 1).mean(0)).sum()
    assert model.alpha == (1.0 if func == "softmax" else 0.1)
    torch.testing.assert_close(model(x, targets=x).aux["balance"], want)


@pytest.mark.parametrize("name, overrides, mode", [
    ("mor_token", [], "topk"),  # token-choice: every token assigned depth 1
    ("mor", [], "causal"),  # expert-choice inference decisions: every token stops after step 1
])
def test_block_runs_at_every_recursion_even_with_no_active_token(name, overrides, mode):
    """ZeRO-3 gathers the shared block's weights per call: data-parallel ranks must make the same
    calls whatever their batch, so a recursion with no active token still runs (on padding) and
    changes nothing."""
    model = make(name, overrides)
    if name == "mor_token":
        with torch.no_grad():  # the router sends every token to depth 1
            model.token_router.bias.fill_(0.0)
            model.token_router.bias[0] = 1e3
        model.routing.balancing = "loss_free"
    else:
        with torch.no_grad():
            for router in model.routers[1:]:  # logit 0 at recursions 2..: nobody continues
                for p in router.parameters():
                    p.fill_(0.0)
    calls = []
    hook = model.shared[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    model.eval()
    x = tokens()
    with torch.no_grad():
        out = model(x, mode=mode)
    hook.remove()
    assert len(calls) == model.layout.recursions, calls
    assert int(out.depth.max()) <= 1, out.depth


@pytest.mark.parametrize("name, overrides", [
    ("mor", []), ("mor", ["routing.gating=none"]), ("mor_kvshare", []), ("mor_token", []),
    ("mor_token", ["kv.strategy=share", "routing.token_func=sigmoid"]), ("recursive", []),
])
@pytest.mark.parametrize("mode", ["topk", "causal"])
def test_a_step_split_into_layer_spans_equals_the_whole_step(name, overrides, mode):
    """step(r, state, span) in pieces (route, some layers, the rest, merge; an empty span between)
    gives the whole step's logits, depths and gradients exactly: a pipeline cut may fall there."""
    model = make(name, overrides)
    n = model.layout.block
    assert n >= 2
    x = tokens()

    def run(split: bool):
        model.zero_grad()
        state = model.begin(x, mode)
        for r in range(model.layout.recursions):
            if split:
                for span in ((0, 1), (1, 1), (1, n)):
                    state = model.step(r, state, span)
                    assert (state.x is None) == (span[1] == n)
            else:
                state = model.step(r, state)
        out = model.finish(state, x)
        out.loss.backward()
        return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    (whole, g_whole), (split, g_split) = run(False), run(True)
    assert torch.equal(whole.logits, split.logits) and torch.equal(whole.depth, split.depth)
    assert g_whole.keys() == g_split.keys() and any(k.startswith("shared.") for k in g_whole)
    for k in g_whole:
        assert torch.equal(g_whole[k], g_split[k]), k
