"""The serving engine gives every request exactly one full causal-mode forward of its sequence
(issue #8's bar, 1e-5 in fp32): decoded alone or among many, with chunked prefill, page boundaries
mid-prompt, fewer rows than requests, preemption when the page pool runs out."""

import pytest
import torch
from torch._dynamo.utils import get_static_address_type

from mor_dist.inference.decode import generate
from mor_dist.inference.engine import ServingEngine, pick
from mor_dist.inference.packed_linear import available, unpack_linears
from tests.inference.helpers import MODELS, prompt, tiny_model

LENGTHS = (5, 17, 9, 30, 3, 12, 1)


def full_forward(model, p, tokens):
    """Logits (from the prompt's last token on) and depths of one causal forward of prompt + tokens."""
    with torch.no_grad():
        full = model(torch.tensor([p + tokens[:-1]]), mode="causal")
    return full.logits[0, len(p) - 1:], full.depth[0].tolist()


@pytest.mark.parametrize("prefill, page", [(256, 16), (4, 3)])
@pytest.mark.parametrize("key", list(MODELS))
def test_decoding_alone_equals_full_causal_forward(key, prefill, page):
    model = tiny_model(key)
    p = prompt(20, seed=3)
    out = generate(model, p, 12, keep_logits=True, prefill_tokens=prefill, page_size=page)
    logits, depths = full_forward(model, p, out["tokens"])
    torch.testing.assert_close(out["logits"], logits, rtol=0, atol=1e-5)
    assert out["tokens"] == logits.argmax(-1).tolist()
    assert out["depths"] == depths
    if key.startswith("mor"):
        assert len(set(depths)) >= 3, "routing too uniform to test anything"


@pytest.mark.parametrize("key", ["mor_expert", "mor_expert_aux", "mor_expert_mlp"])
@pytest.mark.parametrize("pack", [True, False])
def test_router_nets_give_every_routers_logits_and_follow_changes(key, pack):
    """The engine evaluates all routers at once (linear ones as one stacked product): the same
    logits as each router's own call, biased or not, after in-place changes and replaced nets."""
    model = tiny_model(key)
    engine = ServingEngine(model, 2, pack_weights=pack)
    h = torch.randn(5, model.cfg.d_model)

    def check():
        with torch.no_grad():  # as the engine calls them (the packed product serves no autograd)
            main, causal = engine.router_nets(h)
            want = torch.stack([r(h) for r in model.routers], dim=-1)
            want_causal = torch.stack([r.causal_logits(h, want[:, i]) for i, r in enumerate(model.routers)], -1)
        torch.testing.assert_close(main, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(causal, want_causal, rtol=1e-5, atol=1e-5)

    check()
    if key != "mor_expert_mlp":  # linear routers: the packed product served the call where packing is on
        assert (engine.router_nets.packed is not None) == (pack and available())
    with torch.no_grad():
        for p in model.routers.parameters():
            p.mul_(-2.0)
    check()
    if key != "mor_expert_mlp":  # a biased net replacing a bias-free one (as bench/inference.py calibrates)
        with torch.no_grad():
            for i, router in enumerate(model.routers):
                biased = torch.nn.Linear(router.net.in_features, 1, bias=True)
                biased.weight.copy_(router.net.weight)
                biased.bias.fill_(0.5 * i - 0.3)
                router.net = biased
        check()


@pytest.mark.parametrize("rows, prefill, page, pack", [(3, 256, 16, True), (4, 5, 4, True), (8, 7, 2, False)])
@pytest.mark.parametrize("key", ["mor_expert", "mor_expert_share", "mor_token", "mor_token_share", "recursive", "vanilla"])
def test_continuous_batching_equals_full_forward_per_request(key, rows, prefill, page, pack):
    """pack: prepacked CPU weights (the default on CPU) or nn.Linear's own path."""
    model = tiny_model(key)
    prompts = [prompt(n, seed=n) for n in LENGTHS]
    engine = ServingEngine(model, rows, keep_logits=True, prefill_tokens=prefill, page_size=page,
                           pack_weights=pack)
    assert engine.packed == (pack and available())
    ids = [engine.submit(p, 6 + 2 * i) for i, p in enumerate(prompts)]
    done = engine.run()
    assert sorted(done) == ids
    unpack_linears(model)  # the references: nn.Linear's own path
    depths = set()
    for i, p in zip(ids, prompts):
        logits, want = full_forward(model, p, done[i].tokens)
        assert len(done[i].tokens) == 6 + 2 * i
        assert done[i].tokens == logits.argmax(-1).tolist()
        assert done[i].depths == want
        torch.testing.assert_close(torch.stack(done[i].logits), logits, rtol=0, atol=1e-5)
        depths.update(done[i].depths[len(p):])
    if key.startswith("mor"):
        assert len(depths) >= 2, "generated tokens all took one depth: batching across depths untested"
    # Every request finished and gave its pages back.
    assert engine.cache.nbytes() == 0 and len(engine.free_rows) == rows
    assert engine.stats["generated"] == sum(6 + 2 * i for i in range(len(prompts)))


@pytest.mark.parametrize("sharing", ["middle_sequence", "cycle", "sequence"])
def test_other_sharing_layouts_equal_full_forward(sharing):
    """Sequence sharing applies other layers at each step (one block call per depth); Cycle sharing
    has no unique first and last layers."""
    from mor_dist.config import load_config
    from mor_dist.model import build_model

    torch.manual_seed(0)
    layers = 8 if sharing.startswith("middle") else 6  # 6 shared layers: 2 per recursion
    model = build_model(load_config("configs/tiny/mor.yaml", [f"model.sharing={sharing}", f"model.n_layers={layers}"]))
    model.eval()
    with torch.no_grad():
        for router in model.routers:
            for p in router.parameters():
                p.add_(0.01)
    prompts = [prompt(n, seed=n) for n in (9, 4, 13)]
    engine = ServingEngine(model, 2, keep_logits=True, prefill_tokens=5, page_size=4)
    ids = [engine.submit(p, 7) for p in prompts]
    done = engine.run()
    for i, p in zip(ids, prompts):
        logits, want = full_forward(model, p, done[i].tokens)
        assert done[i].depths == want
        torch.testing.assert_close(torch.stack(done[i].logits), logits, rtol=0, atol=1e-5)


def test_shared_block_runs_tokens_of_different_depths_together():
    """Depth-wise batching: in steady state one block call holds tokens at several depths."""
    model = tiny_model("mor_expert")
    engine = ServingEngine(model, 6)
    for n in LENGTHS[:6]:
        engine.submit(prompt(n, seed=n), 20)
    calls = []
    step = engine.block_fn

    def recording(width):
        calls.append(set(engine.depth[engine.go].tolist()))  # depths done by the tokens in the call
        return step(width)

    engine.block_fn = recording
    engine.run()
    assert sum(len(depths) >= 2 for depths in calls) >= 5, calls


@pytest.mark.parametrize("key", ["mor_expert", "mor_expert_share"])
def test_preemption_when_pages_run_out_keeps_outputs_exact(key):
    model = tiny_model(key)
    kv = model.kv_strategy
    prompts = [prompt(n, seed=n) for n in (20, 25, 18, 22)]
    # Room for about two requests' worth of pages at a time: the others wait or get preempted.
    engine = ServingEngine(model, 4, kv=kv, page_size=4, keep_logits=True,
                           kv_pages={"prefix": 24, "suffix": 24, "shared": 24 if kv == "share" else 48})
    ids = [engine.submit(p, 16) for p in prompts]
    done = engine.run()
    assert engine.stats["preemptions"] >= 1
    for i, p in zip(ids, prompts):
        logits, want = full_forward(model, p, done[i].tokens)
        assert done[i].tokens == logits.argmax(-1).tolist() and done[i].depths == want
        torch.testing.assert_close(torch.stack(done[i].logits), logits, rtol=0, atol=1e-5)


def test_eos_stops_a_request():
    model = tiny_model("mor_expert")
    p = prompt(8, seed=2)
    alone = generate(model, p, 10)
    eos = alone["tokens"][3]
    engine = ServingEngine(model, 2)
    rid = engine.submit(p, 10, eos=eos)
    assert engine.run()[rid].tokens == alone["tokens"][: alone["tokens"].index(eos) + 1]


def test_pick_samples_the_softmax_and_never_a_zero_probability_token():
    logits = torch.tensor([[2.0, 0.0, -float("inf"), 1.0, -1.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
    assert pick(logits).tolist() == [0, 4]  # temperature 0: greedy
    n = 20000
    draws = pick(logits.repeat(n, 1), 1.0, torch.Generator().manual_seed(0)).view(n, 2)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).double() / n
        expected = torch.softmax(logits[row].double(), -1)
        # 5 standard errors of a frequency at n draws: a wrong sampler (say, off by one entry) fails.
        assert torch.all((freq - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt() + 1e-12), (freq, expected)
    assert not (draws[:, 0] == 2).any()
    hot = pick(logits.repeat(n, 1), 2.0, torch.Generator().manual_seed(0)).view(n, 2)  # flatter at T=2
    assert (hot[:, 1] == 4).double().mean() < (draws[:, 1] == 4).double().mean()
    again = pick(logits.repeat(n, 1), 1.0, torch.Generator().manual_seed(0)).view(n, 2)
    assert torch.equal(draws, again)  # seeded: reproducible


def test_one_device_to_host_copy_per_tick(monkeypatch):
    """The tick's only transfer to the host is the report (.tolist() of one tensor): no .item(),
    no int()/bool() of a tensor, no nonzero() anywhere in it."""
    model = tiny_model("mor_expert")
    engine = ServingEngine(model, 4, prefill_tokens=8, temperature=1.0)  # sampling syncs nothing either
    for n in (9, 14, 3):
        engine.submit(prompt(n, seed=n), 8)
    calls = {"tolist": 0, "other": 0}
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        calls["tolist"] += 1
        return real_tolist(self)

    def forbidden(name):
        def f(self, *a, **k):
            calls["other"] += 1
            raise AssertionError(f"Tensor.{name} inside a tick")
        return f

    ticks = 0
    with torch.no_grad():
        while engine.busy():
            monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
            for name in ("item", "__bool__", "__int__", "nonzero"):
                monkeypatch.setattr(torch.Tensor, name, forbidden(name))
            engine.tick()
            monkeypatch.undo()
            ticks += 1
    assert calls == {"tolist": ticks, "other": 0}


def test_entries_follow_depths_and_caches_hold_less_than_vanilla():
    p = prompt(40, seed=4)
    mor = tiny_model("mor_expert")
    b = mor.layout.block
    rw, share = generate(mor, p, 2, kv="recursion_wise"), generate(mor, p, 2, kv="share")
    cached = rw["depths"][:-1]  # the last generated token is never fed
    # Recursion-wise: a token writes B entries per depth it reached; sharing: B if it reached step 1.
    assert rw["kv_entries"]["shared"] == b * sum(cached)
    assert share["kv_entries"]["shared"] == b * sum(d >= 1 for d in cached)
    vanilla = generate(tiny_model("vanilla"), p, 2)
    rec = generate(tiny_model("recursive"), p, 2)
    assert vanilla["kv_bytes_per_token"] == rec["kv_bytes_per_token"]  # 8 layer applications each
    assert share["kv_bytes_per_token"] < rw["kv_bytes_per_token"] < vanilla["kv_bytes_per_token"]


def test_generate_rejects_too_long():
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(tiny_model("vanilla"), prompt(250, seed=1), 10)


def test_shared_block_step_compiles_whole_and_gives_the_same_tokens():
    """One decode tick of the shared block is one graph (fullgraph=True: no graph break, so no
    host sync inside) with static shapes; compiled, the engine gives what eager gives."""
    model = tiny_model("mor_expert")
    prompts = [prompt(n, seed=n) for n in (6, 11, 4)]

    def serve(compiled: bool):
        engine = ServingEngine(model, 3, keep_logits=True, width_bucket=4)
        if compiled:
            engine.compile_block(fullgraph=True, dynamic=False)
        ids = [engine.submit(p, 8) for p in prompts]
        done = engine.run()
        return [done[i] for i in ids]

    eager, compiled = serve(False), serve(True)
    for a, b in zip(eager, compiled):
        assert a.tokens == b.tokens and a.depths == b.depths
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", ["mor_expert", "mor_token"])
def test_device_state_stays_where_it_was_allocated(key):
    """What CUDA graphs rely on (compile_block): the rows' state and the shared pools are written in
    place, never replaced, in eager and in compiled ticks, and they are marked static for the
    compiler; the step returns nothing that is kept (a graph's outputs are overwritten by its next
    replay)."""
    model = tiny_model(key)
    for compiled in (False, True):
        engine = ServingEngine(model, 3, width_bucket=4)
        if compiled:
            engine.compile_block(fullgraph=True, dynamic=False)
        tensors = [*engine._row_state(), *engine.cache.shared.device_tensors()]
        where = [t.data_ptr() for t in tensors]
        for n in (6, 11, 4, 9):
            engine.submit(prompt(n, seed=n), 8)
        engine.run()
        after = [*engine._row_state(), *engine.cache.shared.device_tensors()]
        assert all(a is b for a, b in zip(tensors, after)) and [t.data_ptr() for t in after] == where
        assert all(bool(get_static_address_type(t)) == compiled for t in after)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; "
                    "test_device_state_stays_where_it_was_allocated checks on CPU what they rely on")
def test_cuda_graph_ticks_give_the_eager_tokens_with_two_engines_interleaved():
    """compile_block(mode="reduce-overhead") on CUDA: two engines ticking in turn (as
    bench/inference.py runs them) give what eager gives, with no graph skipped."""
    from torch._dynamo.utils import counters

    model = tiny_model("mor_expert").cuda()
    prompts = [prompt(6, 1), prompt(40, 2), prompt(4, 3), prompt(70, 4)]

    def serve(compiled: bool, n: int):
        engines = [ServingEngine(model, 3, keep_logits=True, width_bucket=4) for _ in range(n)]
        for e in engines:
            if compiled:
                e.compile_block(mode="reduce-overhead")
            for i, p in enumerate(prompts):
                e.submit(p, 40 if i % 2 else 12)
        while any(e.busy() for e in engines):
            for e in engines:
                if e.busy():
                    e.tick()
        return [e.finished for e in engines]

    eager = serve(False, 1)[0]
    counters.clear()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:  # CUDA runtime calls are recorded too
        served = serve(True, 2)
    assert any("cudaGraphLaunch" in e.key for e in prof.key_averages())  # graphs did replay
    for done in served:
        for i, want in eager.items():
            assert done[i].tokens == want.tokens and done[i].depths == want.depths
            torch.testing.assert_close(torch.stack(done[i].logits), torch.stack(want.logits), rtol=0, atol=1e-3)
    assert counters["inductor"]["cudagraph_skips"] == 0
