"""Decode-sized matmuls on CPU: nn.Linear's own path (MKL) against weights prepacked for oneDNN
(mor_dist/inference/packed_linear.py), at the row counts a serving tick sees, side by side.

    python bench/packed_linear.py [--json] [--d-model 1024] [--d-ff 2816] [--rows 1 4 8 13 16 24 32 64]

One weight of the MLP's shape (d_ff x d_model, fp32, 1 torch thread). For each row count, rounds
alternate the paths; each round times repeated calls by CPU process time; median GFLOP/s over
--rounds rounds. The first two columns call one weight again and again (it stays in the CPU's
caches); the "streamed" column cycles through --streamed-mib of distinct prepacked weights, so each
call reads its weight from memory, as a decode tick does (a model's weights do not fit in cache):
its time per call shows the cost of reading the weight, paid whatever the row count.
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

from mor_dist.inference.packed_linear import PackedWeight, available  # noqa: E402


def rate(fn, flops: float, seconds: float) -> float:
    """GFLOP/s of fn over about `seconds` of CPU time."""
    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds:
        fn()
        n += 1
    return flops * n / (time.process_time() - t0) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=2816)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 13, 16, 24, 32, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.2, help="CPU time per path per round")
    p.add_argument("--streamed-mib", type=int, default=160, help="distinct weights cycled through (well above the L3 cache)")
    args = p.parse_args(argv)
    if not available():
        print("this torch build has no oneDNN linear: nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = torch.randn(args.d_ff, args.d_model)
    packed = PackedWeight(w)
    copies = max(2, -(-args.streamed_mib * 2**20 // (w.numel() * w.element_size())))
    streamed = [PackedWeight(torch.randn_like(w)) for _ in range(copies)]
    out = {"shape": [args.d_ff, args.d_model], "streamed_weights": copies, "rows": {}}
    with torch.no_grad():
        for s in streamed:  # packed on first use: not timed
            s.linear(torch.zeros(1, args.d_model))
        for m in args.rows:
            x = torch.randn(m, args.d_model)
            flops = 2.0 * m * args.d_model * args.d_ff
            torch.testing.assert_close(packed.linear(x), torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-3)
            plain, pre, stream = [], [], []
            for _ in range(args.rounds):
                plain.append(rate(lambda: torch.nn.functional.linear(x, w), flops, args.seconds))
                pre.append(rate(lambda: packed.linear(x), flops, args.seconds))
                stream.append(rate(lambda: [s.linear(x) for s in streamed], flops * copies, args.seconds))
            out["rows"][m] = {"linear": statistics.median(plain), "prepacked": statistics.median(pre),
                              "prepacked_streamed": statistics.median(stream),
                              "streamed_ms_per_call": flops / statistics.median(stream) / 1e6}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"# bench/packed_linear.py: ({args.d_ff} x {args.d_model}) fp32 weight, 1 thread, CPU process time, "
          f"median GFLOP/s over {args.rounds} interleaved rounds; streamed: {copies} distinct weights "
          f"({copies * w.numel() * w.element_size() / 2**20:.0f} MiB) in turn")
    print("| rows | nn.Linear (MKL) | prepacked (oneDNN) | speed-up | prepacked, streamed | streamed ms/call |")
    print("|---|---|---|---|---|---|")
    for m, r in out["rows"].items():
        print(f"| {m} | {r['linear']:.1f} | {r['prepacked']:.1f} | {r['prepacked'] / r['linear']:.2f}x "
              f"| {r['prepacked_streamed']:.1f} | {r['streamed_ms_per_call']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
