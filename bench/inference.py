"""MoR serving throughput with continuous depth-wise batching, against vanilla baselines, in one run.

    python bench/inference.py [--d-model 256] [--depth 14] [--gen-len 64] [--device cpu|cuda]

Models (random weights, Llama shapes; MoR is Middle-Cycle 1 + B x Nr + 1, expert-choice):
- MoR Nr=2/3/4 with recursion-wise caching, effective depth --depth;
- vanilla of the same effective depth (--depth unique layers);
- vanilla of the same parameter count as each MoR (its unique layers: 2 + B).
Untrained routers would keep about half the tokens at every step. They get a bias, calibrated on
random prompts, so that the fraction of tokens reaching depth r is the paper's capacity
(Nr - r + 1) / Nr (1, 2/3, 1/3 for Nr=3) -- a stand-in for a trained router's decisions; the depths
actually taken while decoding are measured and printed.

Every model is served by the same engine (DepthWiseBatcher; for vanilla it is request-level
continuous batching), with greedy decoding of --gen-len tokens per request, prompts of
--prompt-len/2..--prompt-len tokens, and throughput = generated tokens / wall time (prefill included).
Two settings: a fixed batch (--batch concurrent requests = shared-block slots) and each model's
maximum batch under a memory budget = weights + KV cache, the budget set so that the same-depth
vanilla model fits --batch requests of full length. KV bytes count stored entries (a paged
allocator's footprint), from the depths measured in the fixed-batch run.

Also printed: KV-cache bytes per token of vanilla, recursion-wise caching and KV sharing, measured by
filling the caches with prompts, against the paper's (Nr+1)/(2Nr) and 1/Nr for the recursion layers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mor_dist.config import load_config  # noqa: E402
from mor_dist.inference.decode import forward_chunk  # noqa: E402
from mor_dist.inference.kv_cache import ModelKVCache  # noqa: E402
from mor_dist.inference.serve_bench import serve, synthetic_prompts  # noqa: E402
from mor_dist.model import build_model  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, nargs=2, default=[4, 2], metavar=("HQ", "HKV"))
    p.add_argument("--d-ff", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--depth", type=int, default=14, help="effective depth; depth - 2 divisible by 2, 3, 4")
    p.add_argument("--recursions", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--batch", type=int, default=8, help="fixed batch: concurrent requests (= slots)")
    p.add_argument("--requests", type=int, default=2, help="requests served = this x the batch")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--max-batch-cap", type=int, default=128, help="upper bound on the max-batch setting")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build(args, n_layers: int, recursions: int, dtype):
    sharing = "none" if recursions == 1 else "middle_cycle"
    overrides = [
        f"model.vocab_size={args.vocab}", f"model.d_model={args.d_model}", f"model.n_layers={n_layers}",
        f"model.n_heads={args.heads[0]}", f"model.n_kv_heads={args.heads[1]}", f"model.d_ff={args.d_ff}",
        f"model.max_seq_len={args.prompt_len + args.gen_len + 8}", f"model.recursions={recursions}",
        f"data.seq_len={args.prompt_len + args.gen_len + 8}",
        f"model.sharing={sharing}", f"routing.type={'expert' if recursions > 1 else 'none'}",
    ]
    torch.manual_seed(args.seed)
    model = build_model(load_config(REPO / "configs/tiny/base.yaml", overrides)).eval()
    return model.to(device=args.device, dtype=dtype)


@torch.no_grad()
def calibrate_routers(model, prompts: list[list[int]]) -> None:
    """Give each expert router a bias so that (Nr - r + 1) / Nr of all tokens reach depth r."""
    nr = len(model.routers)
    for r, router in enumerate(model.routers):
        lin = router.net
        biased = torch.nn.Linear(lin.in_features, 1, bias=True).to(lin.weight)
        biased.weight.copy_(lin.weight)
        biased.bias.fill_(0.0)
        router.net = biased
        seen = []
        hook = biased.register_forward_hook(lambda m, i, o: seen.append(o.flatten()))
        for p in prompts:
            model(torch.tensor([p], device=lin.weight.device), mode="causal")
        hook.remove()
        logits = torch.cat(seen).float()
        keep = (nr - r) / (nr - r + 1) if r else 1.0  # of the candidates: tokens that reached step r
        if keep >= 1.0:
            biased.bias.fill_(float(-logits.min()) + 10.0)
        else:
            biased.bias.fill_(-float(torch.quantile(logits, 1.0 - keep)))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def kv_entries_per_token(model, prompts, kv: str) -> float:
    """K/V entries (token x layer call site) per token after prefilling the prompts."""
    cache = ModelKVCache(model, len(prompts), kv)
    for i, p in enumerate(prompts):
        dev = model.embed.weight.device
        forward_chunk(model, cache, torch.tensor([i], device=dev), torch.tensor([p], device=dev),
                      torch.arange(len(p), device=dev)[None])
    e = cache.entries()
    return (e["unique"] + e["shared"]) / int(cache.tokens.sum()), e["shared"] / int(cache.tokens.sum())


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} thread)"
    print(f"# bench/inference.py on {dev_name}, {dtype}; d_model={args.d_model} heads={args.heads} "
          f"d_ff={args.d_ff} vocab={args.vocab}, effective depth {args.depth}")
    if args.device != "cuda":
        print("# no GPU here: CPU figures only (the paper's 2.06x is H100, 360m, max batch)")
    calib = synthetic_prompts(8, args.prompt_len, args.vocab, seed=args.seed + 1)
    n_req = args.requests * args.batch
    prompts = synthetic_prompts(n_req, args.prompt_len, args.vocab, seed=args.seed)
    seq = args.prompt_len + args.gen_len

    models = {f"vanilla L={args.depth} (same depth)": (build(args, args.depth, 1, dtype), "vanilla")}
    for nr in args.recursions:
        mor = build(args, args.depth, nr, dtype)
        calibrate_routers(mor, calib)
        unique = mor.layout.unique_layers
        models[f"MoR Nr={nr} (1+{mor.layout.block}x{nr}+1)"] = (mor, f"mor{nr}")
        models[f"vanilla L={unique} (params of Nr={nr})"] = (build(args, unique, 1, dtype), f"vanilla{nr}")

    # ---------------------------------------------------------------- KV bytes per token
    print("\n## KV-cache entries per token (prefill of 8 prompts), relative to vanilla of the same depth")
    print("| model | cache | entries/token | bytes/token | whole model | recursion layers | paper (recursion layers) |")
    print("|---|---|---|---|---|---|---|")
    van = args.depth
    entry_bytes = 2 * args.heads[1] * (args.d_model // args.heads[0]) * torch.tensor([], dtype=dtype).element_size()
    print(f"| vanilla L={van} | full | {van} | {van * entry_bytes} | 1.000 | 1.000 | 1 |")
    for name, (model, tag) in models.items():
        if not tag.startswith("mor"):
            continue
        nr, lay = model.layout.recursions, model.layout
        for kv, paper in (("recursion_wise", f"(Nr+1)/(2Nr) = {(nr + 1) / (2 * nr):.3f}"), ("share", f"1/Nr = {1 / nr:.3f}")):
            total, shared = kv_entries_per_token(model, calib, kv)
            print(f"| {name} | {kv} | {total:.2f} | {total * entry_bytes:.0f} | {total / van:.3f} | "
                  f"{shared / (lay.block * nr):.3f} | {paper} |")

    # ---------------------------------------------------------------- throughput
    def run(model, batch, requests):
        serve(model, prompts[: min(4, len(prompts))], 4, batch, batch)  # warm-up
        return serve(model, (prompts * (requests // len(prompts) + 1))[:requests], args.gen_len, batch, batch)

    print(f"\n## Throughput, {n_req} requests of {args.gen_len} new tokens (prompts {args.prompt_len // 2}.."
          f"{args.prompt_len}); fixed batch {args.batch}")
    print("| model | params | batch | tokens/s | vs same-depth vanilla | slot fill | mean depth (new tokens) | KV bytes/token |")
    print("|---|---|---|---|---|---|---|---|")
    fixed = {}
    for name, (model, tag) in models.items():
        res = run(model, args.batch, n_req)
        fixed[name] = res
        base = fixed[next(iter(models))]["tokens_per_s"]
        depth = sum(i * f for i, f in enumerate(res["depth_hist"]))
        fill = "-" if res["slot_fill"] is None else f"{res['slot_fill']:.2f}"
        print(f"| {name} | {n_params(model) / 1e6:.2f}M | {args.batch} | {res['tokens_per_s']:.0f} | "
              f"{res['tokens_per_s'] / base:.2f}x | {fill} | {depth:.2f} | {res['kv_bytes_per_token']:.0f} |",
              flush=True)

    # Budget: weights + KV; the same-depth vanilla fits exactly --batch full-length requests.
    ref_name = next(iter(models))
    weight_bytes = {n: n_params(m) * m.embed.weight.element_size() for n, (m, _) in models.items()}
    budget = weight_bytes[ref_name] + args.batch * seq * fixed[ref_name]["kv_bytes_per_token"]
    print(f"\n## Maximum batch under a memory budget of {budget / 2**20:.1f} MiB (weights + KV of {seq}-token "
          f"requests; the same-depth vanilla fits {args.batch})")
    print("| model | weights MiB | max batch | tokens/s | vs same-depth vanilla |")
    print("|---|---|---|---|---|")
    maxb = {}
    for name, (model, tag) in models.items():
        per_req = seq * fixed[name]["kv_bytes_per_token"]
        batch = int((budget - weight_bytes[name]) // per_req)
        batch = max(1, min(batch, args.max_batch_cap))
        res = run(model, batch, max(n_req, 2 * batch))
        maxb[name] = res
        base = maxb[ref_name]["tokens_per_s"]
        print(f"| {name} | {weight_bytes[name] / 2**20:.1f} | {batch} | {res['tokens_per_s']:.0f} | "
              f"{res['tokens_per_s'] / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
