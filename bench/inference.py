"""MoR serving against vanilla, in steady state, measured side by side in one run.

    python bench/inference.py [--quick] [--json] [--d-model 1024] [--batch 32] [--kv-batch 8]

Models (random weights, Llama shapes; MoR is Middle-Cycle 1 + B x Nr + 1, expert-choice):
- vanilla of the same effective depth (--depth unique layers), the reference of every ratio;
- vanilla with the parameters of each MoR (its unique layers, 2 + B);
- MoR Nr = 2, 3, 4, each with recursion-wise caching (rw) and recursive KV sharing (share).
Untrained expert routers keep about half the tokens at every step; each gets a bias so that
(Nr - r + 1) / Nr of tokens reach depth r (1, 2/3, 1/3 for Nr = 3): a stand-in for trained routers.
The biases are calibrated on the engine's own decoding of the benchmark's workload (calibrate_live:
the same closed loop, sampling at temperature 1, before the measured run); the depths actually taken
are measured and printed.

Workload: a closed loop (a request arrives as one finishes) of prompts of prompt_len/2..prompt_len
tokens and gen_len/2..gen_len new tokens. The warm-up (until as many requests as rows have
finished) is not measured. Models run in lockstep: a cycle is one round of --round-ticks engine
ticks of every model in turn, and cycles repeat until every model has finished at least
--requests-per-row x rows requests, so all models get the same number of rounds over the same
stretch of time (the machine's speed drifts; a model measured alone later would see other noise).
Each round gives a decode throughput (tokens / decode time of the round), reported as median
[min-max] over rounds; the ratios are ratios of these medians.
Time is CPU process time on CPU (robust to other load on a shared machine; --threads 1 by default),
wall time on a GPU. Prefill is timed apart (chunked prefill rides in the same ticks).

Two settings: a fixed batch (--batch rows for every model), and an equal KV-cache budget: the bytes
the same-depth vanilla's cache holds at --kv-batch rows of full length (K/V only, weights not
counted); each model gets as many rows as its measured KV bytes per token allow, and its page pool
is capped at the budget (a model that overflows it preempts, counted).

On CPU the engine serves every model, vanilla included, with its Linear weights prepacked for
oneDNN (mor_dist/inference/packed_linear.py; --no-pack-weights for nn.Linear's own matmuls).

Also: KV bytes per token against the paper's (Nr+1)/(2Nr) and 1/Nr for the recursion layers, and
the engine's own overhead (share of a tick outside matmuls and attention, torch profiler).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mor_dist.config import load_config  # noqa: E402
from mor_dist.inference.serve_bench import ClosedLoop, median_spread, synthetic_prompts  # noqa: E402
from mor_dist.model import build_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes for CI (seconds, not minutes)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, nargs=2, default=[16, 4], metavar=("HQ", "HKV"))
    p.add_argument("--d-ff", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--depth", type=int, default=14, help="effective depth; depth - 2 divisible by each Nr")
    p.add_argument("--recursions", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--batch", type=int, default=32, help="fixed-batch setting: rows (concurrent requests)")
    p.add_argument("--kv-batch", type=int, default=8, help="KV budget = the same-depth vanilla's cache at this many rows")
    p.add_argument("--max-batch-cap", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--requests-per-row", type=int, default=8)
    p.add_argument("--round-ticks", type=int, default=24)
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--calibration-seqs", type=int, default=16, help="random sequences for the routers' first setting")
    p.add_argument("--calibration-rounds", type=int, default=3, help="router calibration rounds on the workload's decoding")
    p.add_argument("--calibration-ticks", type=int, default=480,
                   help="engine ticks recorded per calibration round (default: about the stretch MoR-4 is measured over)")
    p.add_argument("--profile-ticks", type=int, default=6, help="ticks profiled per MoR model for the overhead share")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the shared-block step (on CUDA: mode=reduce-overhead, CUDA graphs)")
    p.add_argument("--no-pack-weights", dest="pack_weights", action="store_false",
                   help="CPU: nn.Linear's own matmuls instead of the engine's prepacked oneDNN weights")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:  # small sizes for what the command line leaves unset
        p.set_defaults(d_model=128, heads=[4, 2], d_ff=352, depth=8, recursions=[2, 3], batch=6, kv_batch=2,
                       prompt_len=16, gen_len=12, requests_per_row=3, round_ticks=6, min_rounds=2,
                       profile_ticks=2, page_size=16, calibration_seqs=8, calibration_rounds=2, calibration_ticks=12)
        args = p.parse_args(argv)
    return args


def build(args, n_layers: int, recursions: int, kv: str, dtype):
    sharing = "none" if recursions == 1 else "middle_cycle"
    seq = args.prompt_len + args.gen_len + 8
    overrides = [
        f"model.vocab_size={args.vocab}", f"model.d_model={args.d_model}", f"model.n_layers={n_layers}",
        f"model.n_heads={args.heads[0]}", f"model.n_kv_heads={args.heads[1]}", f"model.d_ff={args.d_ff}",
        f"model.max_seq_len={seq}", f"data.seq_len={seq}", f"model.recursions={recursions}",
        f"model.sharing={sharing}", f"routing.type={'expert' if recursions > 1 else 'none'}", f"kv.strategy={kv}",
    ]
    torch.manual_seed(args.seed)
    model = build_model(load_config(REPO / "configs/tiny/base.yaml", overrides)).eval()
    return model.to(device=args.device, dtype=dtype)


@torch.no_grad()
def calibrate_routers(model, seqs: list[list[int]], starts: list[int]) -> None:
    """Give each expert router a bias so that (Nr - r + 1) / Nr of the tokens at positions >= start
    of each sequence reach depth r. Router r is set after routers 0..r-1 (their decisions fix its
    candidates: the tokens of depth >= r, in position order, which is the order it sees them in)."""
    nr = len(model.routers)
    dev = model.embed.weight.device
    for router in model.routers:
        lin = router.net
        if lin.bias is None:
            biased = torch.nn.Linear(lin.in_features, 1, bias=True).to(lin.weight)
            biased.weight.copy_(lin.weight)
            router.net = biased
        router.net.bias.fill_(0.0)
    for r, router in enumerate(model.routers):
        seen = []
        hook = router.net.register_forward_hook(lambda m, i, o: seen.append(o.flatten()))
        picked = []
        for seq, start in zip(seqs, starts):
            seen.clear()
            out = model(torch.tensor([seq], device=dev), mode="causal")
            cand = (out.depth[0] >= r).nonzero().flatten()  # router r's candidates, in order
            logits = seen[0][: len(cand)] if seen else seen
            if len(cand):
                picked.append(logits[cand >= start])
        hook.remove()
        logits = torch.cat(picked).float()
        keep = (nr - r) / (nr - r + 1) if r else 1.0  # of the candidates: tokens that reached step r
        if keep >= 1.0 or not len(logits):
            router.net.bias.fill_(float(-logits.min()) + 10.0 if len(logits) else 10.0)
        else:
            router.net.bias.fill_(-float(torch.quantile(logits, 1.0 - keep)))


@torch.no_grad()
def calibrate_on_decoding(args, model, kv: str) -> None:
    """A first setting from random sequences of the workload's length, then rounds on the engine's own
    decoding of the benchmark's workload (calibrate_live)."""
    seq_len = args.prompt_len + args.gen_len
    random_seqs = synthetic_prompts(args.calibration_seqs, seq_len, args.vocab, seed=args.seed + 1)
    calibrate_routers(model, random_seqs, [0] * len(random_seqs))
    pooled = {r: [] for r in range(len(model.routers))}
    for _ in range(args.calibration_rounds):
        calibrate_live(args, model, kv, pooled)


@torch.no_grad()
def calibrate_live(args, model, kv: str, pooled: dict) -> None:
    """One round: the benchmark's closed loop (its seed, --batch rows, sampling at temperature 1) runs
    --calibration-ticks ticks after its warm-up while each router's score (logit less its bias) is
    recorded for the tokens it decides on (router 1: every token entering the recursions; router
    r > 1: every token that has just finished step r - 1) and added to `pooled`; then each bias is
    set so that the target share of the pooled scores go on. A request's tokens share much of their
    depth (its context shifts every score), so a quantile over few requests is noisy: one round's
    ~70 requests (150 ticks) moved a router's share by +-0.07 from round to round. Hence the pooling
    over rounds, and the default of 480 ticks a round (~230 requests, about the stretch the slowest
    model is measured over): measured apart, MoR-4 share took a mean depth of 2.55 over 21 measured
    rounds after rounds of 150 ticks, and 2.49 after rounds of 500, against the target 2.50. The
    depths taken in the measured run are printed with the results. Rounds repeat
    because a router's bias changes which tokens the later ones see."""
    nr = len(model.routers)
    loop = ClosedLoop(model, args.batch, args.prompt_len, args.gen_len, seed=args.seed, kv=kv,
                      page_size=args.page_size, temperature=1.0, pack_weights=args.pack_weights)
    engine = loop.engine
    last = [None]  # the routers' latest logits (rows of the call, Nr)
    seen = {r: [] for r in range(nr)}
    recording = [False]
    nets = engine.router_nets

    def nets_recorded(h):
        main, causal = nets(h)
        last[0] = main
        return main, causal

    biases = [router.net.bias for router in model.routers]

    def entry_recorded(plan, sampled):
        last[0] = None
        go = entry(plan, sampled)
        if recording[0] and last[0] is not None:
            seen[0].append(last[0][:, 0].float() - biases[0].float())
        return go

    def route_recorded(block_out):
        go = engine.go.clone()  # rows that ran the step (the step writes engine.go in place)
        depth = engine.depth + go.long()  # their depth after it
        result = route(block_out)
        if recording[0]:
            for r in range(1, nr):  # router r decides step r + 1 for tokens that just finished step r
                seen[r].append(last[0][:, r][go & (depth == r)].float() - biases[r].float())
        return result

    entry, route = engine._entry, engine._route
    engine.router_nets = nets_recorded
    engine._entry, engine._route = entry_recorded, route_recorded
    loop.warm_up()
    recording[0] = True
    for _ in range(args.calibration_ticks):
        loop.step(measure=False)
    for r, bias in enumerate(biases):
        if not seen[r]:
            continue
        pooled[r].append(torch.cat(seen[r]))
        every = torch.cat(pooled[r])
        keep = (nr - r) / (nr - r + 1) if r else 1.0
        # Every token goes on past router 1 (with a margin); the others keep their quantile.
        bias.fill_(10.0 - float(every.min()) if keep >= 1.0 else -float(torch.quantile(every, 1.0 - keep)))


def mean_depth(hist: list[float]) -> float:
    return sum(i * f for i, f in enumerate(hist))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def models_to_compare(args, dtype) -> dict:
    """name -> (model, kv). The first is the reference (vanilla of the same effective depth)."""
    models = {"vanilla": (build(args, args.depth, 1, "recursion_wise", dtype), "recursion_wise")}
    for nr in args.recursions:
        for kv, tag in (("recursion_wise", "rw"), ("share", "share")):
            mor = build(args, args.depth, nr, kv, dtype)
            calibrate_on_decoding(args, mor, kv)
            print(f"  calibrated: mor{nr}_{tag}", file=sys.stderr, flush=True)
            models[f"mor{nr}_{tag}"] = (mor, kv)
        unique = models[f"mor{nr}_rw"][0].layout.unique_layers
        models[f"vanilla_params_mor{nr}"] = (build(args, unique, 1, "recursion_wise", dtype), "recursion_wise")
    return models


def run_setting(args, models: dict, rows: dict, kv_pages: dict) -> dict:
    """Rounds over every model's closed loop in lockstep: each cycle runs one round of every model,
    and cycles go on until every model has finished --requests-per-row x its rows requests since
    its warm-up (requests keep arriving meanwhile), so every model is measured over the same number
    of rounds, spread over the same stretch of time. Per model, the rounds' decode tokens/s and the
    steady-state summary."""
    loops, start = {}, {}
    for name, (model, kv) in models.items():
        loop = ClosedLoop(model, rows[name], args.prompt_len, args.gen_len, seed=args.seed, kv=kv,
                          page_size=args.page_size, kv_pages=kv_pages.get(name), temperature=1.0,
                          width_bucket=4 if args.compile else 1, pack_weights=args.pack_weights)
        if args.compile:
            loop.engine.compile_block()  # CUDA graphs on a GPU
        loop.warm_up()
        loops[name], start[name] = loop, len(loop.engine.finished)
        print(f"  warm: {name} ({rows[name]} rows)", file=sys.stderr, flush=True)
    rounds = {name: [] for name in loops}

    def served_enough() -> bool:
        return all(len(loop.engine.finished) - start[name] >= args.requests_per_row * rows[name]
                   for name, loop in loops.items())

    cycles = 0
    while cycles < args.min_rounds or not served_enough():
        for name, loop in loops.items():
            rounds[name].append(loop.run_round(args.round_ticks)["decode_tokens_per_s"])
        cycles += 1
    return {name: {"rounds": rounds[name], **median_spread(rounds[name]), **loops[name].summary()}
            for name in loops}


def profile_overhead(args, model, kv: str, rows: int) -> float:
    """Share of decode ticks (CPU time) spent outside matmuls (aten::mm/addmm, or oneDNN's with
    prepacked weights) and attention
    (paged_attention: page gathers + SDPA): the engine's bookkeeping, routing, norms, RoPE,
    sampling. Profiled after arrivals stop and the last prompts are in, so no prefill mixes in."""
    from torch.profiler import ProfilerActivity, profile

    loop = ClosedLoop(model, rows, args.prompt_len, args.gen_len, seed=args.seed + 7,
                      total=args.requests_per_row * rows, kv=kv, page_size=args.page_size, temperature=1.0,
                      pack_weights=args.pack_weights)
    loop.warm_up()
    loop.total = loop.submitted  # no more arrivals
    while loop.engine.waiting or loop.engine.prefilling:
        loop.step(measure=False)
    decode_s = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_ticks):
            decode_s += loop.step(measure=False)["decode_s"]
    ops = {e.key: e for e in prof.key_averages()}
    matmuls = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")  # plain and prepacked weights
    inside = sum(ops[k].self_cpu_time_total for k in matmuls if k in ops) + (
        ops["mor::paged_attention"].cpu_time_total if "mor::paged_attention" in ops else 0.0)
    return max(0.0, 1.0 - inside / 1e6 / decode_s) if decode_s else None


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} thread)"
    if args.device == "cpu":
        from mor_dist.inference.packed_linear import available

        # torch.compile traces nn.Linear's own forward: compiled runs leave every model unpacked, alike.
        args.pack_weights = args.pack_weights and available() and not args.compile
        where += ", prepacked oneDNN weights" if args.pack_weights else ", nn.Linear matmuls"
    else:
        args.pack_weights = False
    out = {"device": where, "dtype": str(dtype).replace("torch.", ""), "args": vars(args)}
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    log(f"# bench/inference.py on {where}, {out['dtype']}; d_model={args.d_model} heads={args.heads} d_ff={args.d_ff} "
        f"vocab={args.vocab}, effective depth {args.depth}; prompts {args.prompt_len // 2}..{args.prompt_len}, "
        f"{args.gen_len // 2}..{args.gen_len} new tokens")

    models = models_to_compare(args, dtype)
    out["params"] = {name: n_params(m) for name, (m, _) in models.items()}

    # ---------------------------------------------------------------- fixed batch
    log(f"\n## Fixed batch: {args.batch} rows for every model")
    fixed = run_setting(args, models, {name: args.batch for name in models}, {})
    out["fixed_batch"] = fixed
    ref = fixed["vanilla"]["median"]
    out["fixed_batch_ratio"] = {n: r["median"] / ref for n, r in fixed.items() if n.startswith("mor") and ref}
    out["fixed_batch_paired_ratio"] = paired_ratios(fixed)

    # ---------------------------------------------------------------- against the compute ceiling
    # Layer passes per token: vanilla `depth`, MoR unique + block x mean depth. The calibrated
    # capacities give a mean depth of (Nr + 1) / 2; the depth taken in the run is what counts here.
    out["compute_ceiling"] = {}
    for name, (model, _) in models.items():
        lay = model.layout
        if not lay.recursions or not fixed[name]["median"]:
            continue
        depth = mean_depth(fixed[name]["depth_hist"])
        ceiling = args.depth / (lay.prefix + lay.suffix + lay.block * depth)
        out["compute_ceiling"][name] = {"mean_depth": depth, "target_depth": (lay.recursions + 1) / 2,
                                        "ceiling": ceiling, "of_ceiling": out["fixed_batch_ratio"][name] / ceiling}

    # ---------------------------------------------------------------- KV bytes per token
    van_bpt = fixed["vanilla"]["kv_bytes_per_token"]
    out["kv_bytes_per_token"] = {}
    for name, (model, kv) in models.items():
        lay = model.layout
        got = fixed[name]["kv_bytes_per_token"]
        out["kv_bytes_per_token"][name] = {"bytes": got, "vs_vanilla": got / van_bpt}
        if lay.recursions:
            unique_bytes = (lay.prefix + lay.suffix) * van_bpt / args.depth
            recursion = (got - unique_bytes) / (lay.block * lay.recursions * van_bpt / args.depth)
            nr = lay.recursions
            paper = (nr + 1) / (2 * nr) if kv == "recursion_wise" else 1 / nr
            out["kv_bytes_per_token"][name].update(recursion_layers=recursion, paper=paper)

    # ---------------------------------------------------------------- equal KV budget
    seq = args.prompt_len + args.gen_len
    budget = args.kv_batch * seq * van_bpt
    rows, pages = {}, {}
    for name, (model, kv) in models.items():
        per_request = seq * fixed[name]["kv_bytes_per_token"]
        rows[name] = max(1, min(args.max_batch_cap, int(budget // per_request)))
        pages[name] = pool_pages(model, kv, rows[name], budget, args.page_size, seq)
    log(f"\n## Equal KV budget: {budget / 2**20:.2f} MiB of K/V (the same-depth vanilla at {args.kv_batch} rows of "
        f"{seq} tokens)")
    kvb = run_setting(args, models, rows, pages)
    out["kv_budget"] = {"budget_bytes": budget, **kvb}
    ref = kvb["vanilla"]["median"]
    out["kv_budget_ratio"] = {n: r["median"] / ref for n, r in kvb.items() if n.startswith("mor") and ref}
    out["kv_budget_paired_ratio"] = paired_ratios(kvb)

    # ---------------------------------------------------------------- engine overhead
    out["overhead_share"] = {}
    if args.device == "cpu" and args.profile_ticks:
        for name, (model, kv) in models.items():
            if name.startswith("mor"):
                out["overhead_share"][name] = profile_overhead(args, model, kv, args.batch)

    report(out, log)
    if args.json:
        print(json.dumps(out, default=float))
    return 0


def paired_ratios(setting: dict) -> dict:
    """Per MoR model, the median over cycles of its round's tokens/s over vanilla's round of the same
    cycle (lockstep: the two ran minutes apart at most): drift of the machine's speed between cycles
    cancels in each pair, which the ratio of the two medians does not do. A second estimate beside
    the ratio of medians (the one the targets are read from), not a replacement."""
    ref = setting["vanilla"]["rounds"]
    return {name: median_spread([m / v for m, v in zip(r["rounds"], ref) if m and v])["median"]
            for name, r in setting.items() if name.startswith("mor") and isinstance(r, dict)}


def pool_pages(model, kv: str, rows: int, budget: float, page_size: int, seq: int) -> dict:
    """Page pools within the budget: the unique layers' pools hold every row at full length (their
    use is fixed), the shared block's pool gets the rest of the budget (its use follows routing)."""
    from mor_dist.inference.paged_cache import PagedKVCache

    cache = PagedKVCache(model, 1, kv, page_size, pages={"prefix": 2, "suffix": 2, "shared": 2})
    per_row = math.ceil(seq / page_size)
    unique = {g: rows * per_row + 1 for g in ("prefix", "suffix")}
    kv_page = {name: g.sites * g.entry_bytes() * page_size if g.sites else 0 for name, g in
               (("prefix", cache.prefix), ("suffix", cache.suffix), ("shared", cache.shared))}
    used = sum(unique[g] * kv_page[g] for g in unique)
    shared = int(max(budget - used, 0) // kv_page["shared"]) + 1 if kv_page["shared"] else 1
    return {**unique, "shared": max(shared, 2)}


def report(out: dict, log) -> None:
    def fmt(x, spec=".0f"):
        return "-" if x is None else format(x, spec)

    for setting in ("fixed_batch", "kv_budget"):
        res = out[setting]
        log(f"\n### {setting.replace('_', ' ')}: decode tokens/s (median [min-max] over rounds)")
        log("| model | params | rows | decode tok/s | vs vanilla | prefill tok/s | TTFT p50/p99 ms | ITL p50/p99 ms "
            "| mean depth | KV B/token | preempted |")
        log("|---|---|---|---|---|---|---|---|---|---|---|")
        ref = res["vanilla"]["median"]
        for name, r in res.items():
            if not isinstance(r, dict):
                continue
            depth = mean_depth(r["depth_hist"])
            ms = lambda a, b: f"{fmt(a and a * 1e3)}/{fmt(b and b * 1e3)}"  # noqa: E731
            log(f"| {name} | {out['params'][name] / 1e6:.1f}M | {r['rows']} | {fmt(r['median'])} "
                f"[{fmt(r['min'])}-{fmt(r['max'])}] | {fmt(r['median'] / ref if r['median'] and ref else None, '.2f')}x | "
                f"{fmt(r['prefill_tokens_per_s'])} | {ms(r['ttft_p50_s'], r['ttft_p99_s'])} | "
                f"{ms(r['itl_p50_s'], r['itl_p99_s'])} | {depth:.2f} | {fmt(r['kv_bytes_per_token'])} | {r['preemptions']} |")
        paired = out[f"{setting}_paired_ratio"]
        log("Paired (median over cycles of the round's ratio to vanilla's): "
            + ", ".join(f"{name} {fmt(x, '.3f')}x" for name, x in paired.items()))
    if out.get("compute_ceiling"):
        log("\n### Fixed batch against the compute ceiling (layer passes per token at the depth taken)")
        log("| model | mean depth (target) | ceiling | vs vanilla | of ceiling |")
        log("|---|---|---|---|---|")
        for name, c in out["compute_ceiling"].items():
            log(f"| {name} | {c['mean_depth']:.2f} ({c['target_depth']:.2f}) | {c['ceiling']:.2f}x | "
                f"{out['fixed_batch_ratio'][name]:.2f}x | {c['of_ceiling'] * 100:.0f}% |")
    log("\n### KV-cache bytes per token (fixed-batch run's depths)")
    log("| model | bytes/token | vs vanilla | recursion layers | paper (recursion layers) |")
    log("|---|---|---|---|---|")
    for name, k in out["kv_bytes_per_token"].items():
        log(f"| {name} | {k['bytes']:.0f} | {k['vs_vanilla']:.3f} | {fmt(k.get('recursion_layers'), '.3f')} | "
            f"{fmt(k.get('paper'), '.3f')} |")
    if out["overhead_share"]:
        log("\n### Engine overhead: share of decode ticks outside matmuls and attention (torch profiler, "
            f"{out['args']['batch']} rows)")
        for name, share in out["overhead_share"].items():
            log(f"- {name}: {fmt(share and share * 100, '.1f')}%")


if __name__ == "__main__":
    sys.exit(main())
