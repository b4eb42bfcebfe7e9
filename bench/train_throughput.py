"""Training throughput: MoR against vanilla and recursive models of the same effective depth, eager
and compiled, measured side by side in one run.

    python bench/train_throughput.py [--quick] [--json] [--d-model 512] [--depth 14]

Models (random weights, Llama shapes): vanilla with --depth layers, the recursive model and MoR
(expert-choice, Middle-Cycle 1 + B x Nr + 1, recursion-wise caching) with the same effective depth,
for each Nr of --recursions. A step is what the train module does on one process: forward with
top-k routing, backward, gradient clipping, AdamW. Each model runs eager and under torch.compile
(inductor; compilation and the first steps are warm-up, not measured). Rounds of --steps steps,
model after model, repeated --rounds times; tokens/s per round, reported as median [min-max]; CPU
process time (1 torch thread by default) so other load on the machine does not count.

Printed for each model: tokens/s eager and compiled, the compile speed-up, and its speed-up over the
same-depth vanilla next to the ratio of training FLOPs per token (mor_dist.model.accounting); their
quotient is how much of its FLOP ratio the step realizes (100%: as much faster as the FLOPs say).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mor_dist.config import load_config  # noqa: E402
from mor_dist.model import build_model  # noqa: E402
from mor_dist.model.accounting import train_flops_per_token  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for CI")
    p.add_argument("--json", action="store_true")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, nargs=2, default=[8, 4])
    p.add_argument("--d-ff", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--depth", type=int, default=14)
    p.add_argument("--recursions", type=int, nargs="+", default=[3])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (compilation happens here)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--preset", help="a paper preset folder instead of the sizes above, e.g. configs/paper/360m: "
                   "its vanilla.yaml, recursive_nr{Nr}.yaml and mor_nr{Nr}.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 (autocast; default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--peak-tflops", type=float, help="per device, for MFU (default: logging.peak_tflops's rule)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:  # small sizes for what the command line leaves unset
        p.set_defaults(d_model=64, heads=[4, 2], d_ff=160, depth=8, recursions=[3], batch=2, seq_len=32,
                       steps=1, rounds=2, warmup=1)
        args = p.parse_args(argv)
    return args


def config(args, kind: str, nr: int):
    if args.preset:
        name = "vanilla" if kind == "vanilla" else f"{'recursive' if kind == 'recursive' else 'mor'}_nr{nr}"
        return load_config(Path(args.preset) / f"{name}.yaml", [f"data.seq_len={args.seq_len}"])
    sharing, routing, recursions = {"vanilla": ("none", "none", 1), "recursive": ("middle_cycle", "none", nr),
                                    "mor": ("middle_cycle", "expert", nr)}[kind]
    return load_config(REPO / "configs/tiny/base.yaml", [
        f"model.vocab_size={args.vocab}", f"model.d_model={args.d_model}", f"model.n_layers={args.depth}",
        f"model.n_heads={args.heads[0]}", f"model.n_kv_heads={args.heads[1]}", f"model.d_ff={args.d_ff}",
        f"model.max_seq_len={args.seq_len}", f"data.seq_len={args.seq_len}", f"model.recursions={recursions}",
        f"model.sharing={sharing}", f"routing.type={routing}", "optim.grad_clip=1.0",
    ])


class Runner:
    """One model and its optimizer, eager or compiled; step() is one training step and returns its
    time (CPU process time on CPU; wall time after a device sync on a GPU)."""

    def __init__(self, args, cfg, compiled: bool):
        torch.manual_seed(args.seed)
        self.device = torch.device(args.device)
        self.model = build_model(cfg).train().to(self.device)
        self.forward = torch.compile(self.model) if compiled else self.model
        fused = self.device.type == "cuda" or None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused)
        self.bf16 = (args.dtype or ("bf16" if self.device.type == "cuda" else "fp32")) == "bf16"
        g = torch.Generator().manual_seed(args.seed)
        vocab = cfg.model.vocab_size
        self.batch = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=g).to(self.device)
        self.tokens = args.batch * args.seq_len
        self.flops = train_flops_per_token(cfg)

    def _clock(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def step(self) -> float:
        t0 = self._clock()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward(self.batch[:, :-1], self.batch[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.after_optimizer_step()
        return self._clock() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    kinds = [("vanilla", 1)] + [(k, nr) for nr in args.recursions for k in ("recursive", "mor")]
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    runners = {}
    for kind, nr in kinds:
        name = kind if kind == "vanilla" else f"{kind}{nr}"
        for mode in modes:
            r = Runner(args, config(args, kind, nr), mode == "compiled")
            t0 = time.time()
            for _ in range(args.warmup):
                r.step()
            log(f"  warm: {name} {mode} ({time.time() - t0:.0f} s)")
            runners[(name, mode)] = r
    rounds = {key: [] for key in runners}
    for _ in range(args.rounds):
        for key, r in runners.items():
            rounds[key].append(r.tokens * args.steps / sum(r.step() for _ in range(args.steps)))
    med = {key: statistics.median(v) for key, v in rounds.items()}
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} thread)"
    from mor_dist.training.peak_flops import resolve_peak_tflops

    bf16 = runners[next(iter(runners))].bf16
    dtype = "bf16" if bf16 else "fp32"
    peak = resolve_peak_tflops(args.peak_tflops, dtype=torch.bfloat16 if bf16 else torch.float32) * 1e12
    out = {"device": where, "peak_tflops": peak / 1e12, "args": vars(args), "models": {}}
    shapes = (f"preset {args.preset}" if args.preset else f"d_model={args.d_model} heads={args.heads} d_ff={args.d_ff} "
              f"vocab={args.vocab}, effective depth {args.depth}")
    log(f"# bench/train_throughput.py on {where}, {dtype}; {shapes}, {args.batch} x {args.seq_len} tokens per step; "
        f"median [min-max] over {args.rounds} rounds of {args.steps} steps; MFU against {peak / 1e12:.3g} TFLOPS")
    log("| model | train FLOPs/token | vs vanilla (FLOPs) | mode | tokens/s | vs vanilla (same mode) | "
        "realized of FLOP ratio | compile speed-up | MFU |")
    log("|---|---|---|---|---|---|---|---|---|")
    van_flops = runners[("vanilla", "eager")].flops
    for (name, mode), r in runners.items():
        flop_ratio = van_flops / r.flops
        speed = med[(name, mode)] / med[("vanilla", mode)]
        realized = speed / flop_ratio  # 1.0: the step is as much faster as the FLOPs say
        compile_gain = med[(name, "compiled")] / med[(name, "eager")] if mode == "compiled" else None
        mfu = r.flops * med[(name, mode)] / peak
        out["models"].setdefault(name, {"train_flops_per_token": r.flops, "flop_ratio": flop_ratio})[mode] = {
            "tokens_per_s": med[(name, mode)], "rounds": rounds[(name, mode)], "speedup_vs_vanilla": speed,
            "realized_of_flop_ratio": realized, "compile_speedup": compile_gain, "mfu": mfu,
        }
        log(f"| {name} | {r.flops / 1e6:.1f}M | {flop_ratio:.2f}x | {mode} | {med[(name, mode)]:.0f} "
            f"[{min(rounds[(name, mode)]):.0f}-{max(rounds[(name, mode)]):.0f}] | {speed:.2f}x | "
            f"{realized:.0%} | "
            f"{'-' if compile_gain is None else f'{compile_gain:.2f}x'} | {mfu:.1%} |")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
