"""The training forward (top-k routing) is one graph: torch.compile(fullgraph=True) captures forward
and backward with no graph break -- so no host sync inside -- and gives eager's loss and gradients.

The aot_eager backend traces exactly what inductor would compile (graph capture and autograd),
without minutes of C++ code generation per model on a CPU; bench/train_throughput.py runs inductor.
"""

import pytest
import torch

from tests.model.test_mor import make, tokens


@pytest.mark.parametrize("name", ["vanilla", "recursive", "mor", "mor_kvshare", "mor_aux"])
def test_training_step_compiles_whole_and_matches_eager(name):
    torch._dynamo.reset()
    overrides = ["routing.causal_method=aux_router"] if name == "mor_aux" else []
    model = make("mor" if name == "mor_aux" else name, overrides).train()
    x, y = tokens(t=32), tokens(t=32, seed=2)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        out = fn(x, y)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, g_eager = grads(model)
    compiled, g_comp = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=0, atol=1e-6)
    assert g_comp.keys() == g_eager.keys() and len(g_eager) > 10
    for n in g_eager:
        torch.testing.assert_close(g_comp[n], g_eager[n], rtol=1e-5, atol=1e-6, msg=n)
    for k, v in eager.stats.items():  # routing statistics too (they stay on the device)
        torch.testing.assert_close(compiled.stats[k], v, msg=k)


def test_token_choice_syncs_only_where_shapes_depend_on_data():
    """Token-choice gathers the tokens each step runs, whose count is data: that one sync per step
    (routers.compact) is a graph break; the rest compiles (no other break is allowed)."""
    model = make("mor_token").train()
    explanation = torch._dynamo.explain(model)(tokens(t=32), tokens(t=32, seed=2))
    reasons = " ".join(str(b.reason) for b in explanation.break_reasons)
    assert explanation.graph_break_count >= 1
    assert all("compact" in "".join(str(f) for f in b.user_stack) for b in explanation.break_reasons), reasons


@pytest.mark.parametrize("name", ["mor", "mor_kvshare"])
def test_training_outputs_live_on_the_models_device(name):
    """Every loss, aux loss and routing statistic is made where the model runs (the trainer joins
    them in one torch.cat for its single host copy; one CPU stat among CUDA ones fails there), and a
    moved model has its RoPE tables for the new device before any compiled forward (built inside
    one, the next call would fail the graph's guard and compile again). The meta device stands in
    for a GPU: it runs the shapes without data."""
    from mor_dist.model.layers import RotaryEmbedding

    model = make(name).train().to("meta")
    assert all("meta" in r._tables for r in model.modules() if isinstance(r, RotaryEmbedding))
    x = torch.zeros(2, 32, dtype=torch.long, device="meta")
    out = model(x, x)
    where = {k: v.device.type for k, v in {"loss": out.loss, **out.aux, **out.stats}.items()}
    assert set(where.values()) == {"meta"} and any(k.startswith("active_frac") for k in where), where


@pytest.mark.parametrize("name, warmup", [("mor", "routing.capacity_warmup_steps=3"),
                                          ("mor_token", "routing.max_depth_warmup_steps=3")])
def test_a_routing_warmup_runs_eager_and_the_steps_after_it_compile_once(name, warmup):
    """Inside a routing warmup the schedule moves with the step (top-k size, forced depth), so
    train.compile runs it eager; after it the forward no longer reads the step counter, and the
    compiled forward is not compiled again at every step (torch's recompile limit would otherwise
    leave it eager from the 9th step on)."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from mor_dist.config import load_config
    from mor_dist.parallel.compile import apply_compile

    torch._dynamo.reset()
    counters.clear()
    model = make(name, [warmup]).train()
    cfg = load_config(f"configs/tiny/{name}.yaml", ["parallel.zero_stage=1"])
    dims = SimpleNamespace(tp=1, pp=1, rank=0)
    with torch._dynamo.config.patch(cache_size_limit=64):
        assert apply_compile(model, cfg, dims, backend="aot_eager")
        frames = []
        for _ in range(7):
            out = model(tokens(t=32), tokens(t=32, seed=2))
            out.loss.backward()
            model.after_optimizer_step()
            frames.append(counters["stats"]["unique_graphs"])
    assert frames[:3] == [0, 0, 0]  # the 3 warmup steps: eager
    assert frames[3] >= 1 and frames[-1] == frames[3], frames  # compiled at step 4, not again
