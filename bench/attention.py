"""Routed attention on a GPU: the Triton kernels against torch SDPA on gathered tensors and against
dense masked attention over all T tokens, at capacities 1, 2/3 and 1/3.

    python bench/attention.py [--seqlens 2048 4096] [--head-dims 64 128] [--dtype bf16]

Each sequence keeps the same number of active tokens n = round(capacity * T) (expert-choice routing),
at random non-contiguous positions. Modes:
- recursion: queries and keys are the n active tokens, causal by position;
- kv_share: queries are the n active tokens, keys all T tokens of recursion 1.
Methods:
- triton-varlen: routed_attention_varlen on packed (B*n, H, D) tensors;
- triton-padded: routed_attention on the gathered (B, H, n, D) tensors (the model's call, read in place);
- sdpa-gathered: F.scaled_dot_product_attention on the gathered tensors (is_causal for recursion,
  a position mask for kv_share);
- dense-masked: SDPA over all T tokens with the routing folded into a mask (what running MoR without
  gathering costs).
FLOPs are each method's own: 4*D*H per visible (query, key) pair forward, causal work counted as the
lower triangle; backward counts 2.5x forward. Times are medians of CUDA-event timings after warmup
(the first calls also autotune the Triton kernels).

Without a GPU it says so and exits 0; --cpu-smoke instead runs tiny shapes through the Triton
interpreter to check the script's plumbing (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch: B = tokens // T")
    p.add_argument("--heads", type=int, nargs=2, default=[15, 5], metavar=("HQ", "HKV"))
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--capacities", type=float, nargs="+", default=[1.0, 2 / 3, 1 / 3])
    p.add_argument("--modes", nargs="+", default=["recursion", "kv_share"], choices=["recursion", "kv_share"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes under the Triton interpreter, no GPU")
    return p.parse_args()


def make_problem(torch, mode, b, t, hq, hkv, d, capacity, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = max(1, round(capacity * t))
    pos = torch.stack([torch.randperm(t, generator=g)[:n].sort().values for _ in range(b)]).to(device)
    full = [torch.randn(b, h, t, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv)]
    idx = pos[:, None, :, None]
    q = full[0].gather(2, idx.expand(b, hq, n, d))
    if mode == "recursion":
        k, v = (x.gather(2, idx.expand(b, hkv, n, d)) for x in full[1:])
        k_pos = pos
    else:
        k, v = full[1], full[2]
        k_pos = torch.arange(t, device=device).expand(b, t)
    return dict(n=n, pos=pos, k_pos=k_pos, q=q, k=k, v=v, full=full)


def visible_pairs(torch, q_pos, k_pos):
    """Exact count of (query, key) pairs with k_pos <= q_pos, summed over the batch."""
    return int((k_pos[:, None, :] <= q_pos[:, :, None]).sum())


def methods(torch, F, kernels, mode, prob, t):
    b, hq, n, d = prob["q"].shape
    hkv = prob["k"].shape[1]
    q, k, v, pos, k_pos = prob["q"], prob["k"], prob["v"], prob["pos"], prob["k_pos"]
    n_k = k.shape[2]
    dev = q.device

    packed = [x.transpose(1, 2).reshape(-1, x.shape[1], d).contiguous() for x in (q, k, v)]
    cu_q = torch.arange(b + 1, device=dev, dtype=torch.int32) * n
    cu_k = torch.arange(b + 1, device=dev, dtype=torch.int32) * n_k
    q_pos_p, k_pos_p = pos.reshape(-1).contiguous(), k_pos.reshape(-1).contiguous()

    def triton_varlen(qq, kk, vv):
        return kernels.routed_attention_varlen(qq, kk, vv, cu_q, cu_k, q_pos_p, k_pos_p, n, n_k, backend="triton")

    same = mode == "recursion"

    def triton_padded(qq, kk, vv):
        return kernels.routed_attention(qq, kk, vv, pos, k_pos, same_tokens=same, backend="triton")

    # SDPA with an explicit mask gets K/V heads expanded up front (not timed): its memory-efficient
    # kernel may not take grouped heads, and the math fallback would not be a fair baseline.
    def expand(x):
        return x.repeat_interleave(hq // hkv, dim=1)

    if same:
        gathered_in = [q, k, v]

        def sdpa_gathered(qq, kk, vv):
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
    else:
        gathered_in = [q, expand(k), expand(v)]
        share_mask = (k_pos[:, None, :] <= pos[:, :, None])[:, None]

        def sdpa_gathered(qq, kk, vv):
            return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=share_mask)

    # Dense: every token of the sequence is a query; keys outside the active set are masked out (the
    # diagonal stays on so inactive rows do not become all -inf). KV-sharing keys are all tokens.
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    dense_in = prob["full"]
    if same:
        active = torch.zeros(b, t, dtype=torch.bool, device=dev).scatter_(1, pos, True)
        dense_mask = (causal & active[:, None, :] | torch.eye(t, dtype=torch.bool, device=dev))[:, None]
        dense_in = [dense_in[0], expand(dense_in[1]), expand(dense_in[2])]

        def dense(qq, kk, vv):
            return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=dense_mask)
    else:
        def dense(qq, kk, vv):
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)

    routed_pairs = visible_pairs(torch, pos, k_pos)
    dense_pairs = b * t * (t + 1) // 2
    return [
        ("triton-varlen", triton_varlen, packed, routed_pairs),
        ("triton-padded", triton_padded, [q, k, v], routed_pairs),
        ("sdpa-gathered", sdpa_gathered, gathered_in, routed_pairs),
        ("dense-masked", dense, dense_in, dense_pairs),
    ]


def timer(torch, smoke):
    if smoke:
        def run(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return run

    def run(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    return run


def bench(torch, fn, inputs, args, smoke):
    measure = timer(torch, smoke)
    fwd_in = [x.detach() for x in inputs]
    bwd_in = [x.detach().requires_grad_() for x in inputs]
    grad = torch.randn_like(fn(*fwd_in))

    def fwd():
        with torch.no_grad():
            fn(*fwd_in)

    def fwd_bwd():
        torch.autograd.grad(fn(*bwd_in), bwd_in, grad)

    results = []
    for step in (fwd,) if args.fwd_only else (fwd, fwd_bwd):
        for _ in range(args.warmup):
            step()
        results.append(statistics.median(measure(step) for _ in range(args.reps)))
    return results


def main():
    args = parse_args()
    if args.cpu_smoke:
        # Must precede the first Triton import (torch.cuda/ dynamo may import it).
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F

    from mor_dist import kernels

    if args.cpu_smoke:
        device, dtype = "cpu", torch.float32
        args.seqlens, args.tokens, args.heads, args.head_dims = [48], 96, [2, 1], [16]
        args.warmup, args.reps = 1, 1
        print("CPU smoke run under the Triton interpreter: checks the plumbing, timings are meaningless")
    elif not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA GPU (none found); nothing to time.")
        return 0
    else:
        device, dtype = "cuda", getattr(torch, DTYPES[args.dtype])
        print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")

    hq, hkv = args.heads
    header = f"{'mode':9} {'T':>5} {'B':>3} {'D':>4} {'cap':>5} {'n':>5} {'method':14} {'fwd ms':>8} {'TFLOP/s':>8}"
    if not args.fwd_only:
        header += f" {'fwd+bwd ms':>11} {'TFLOP/s':>8}"
    print(header)
    for mode in args.modes:
        for t in args.seqlens:
            b = max(1, args.tokens // t)
            for d in args.head_dims:
                for cap in args.capacities:
                    prob = make_problem(torch, mode, b, t, hq, hkv, d, cap, dtype, device)
                    rows = methods(torch, F, kernels, mode, prob, t)
                    # Sanity: the kernels agree with SDPA before anything is timed.
                    ref = rows[2][1](*rows[2][2]).float()
                    err = (rows[0][1](*rows[0][2]).float() - ref.transpose(1, 2).reshape(-1, hq, d)).abs().max()
                    err = max(float(err), float((rows[1][1](*rows[1][2]).float() - ref).abs().max()))
                    for name, fn, inputs, pairs in rows:
                        times = bench(torch, fn, inputs, args, args.cpu_smoke)
                        flops = 4 * d * hq * pairs
                        line = (f"{mode:9} {t:5d} {b:3d} {d:4d} {cap:5.3f} {prob['n']:5d} {name:14} "
                                f"{times[0]:8.3f} {flops / times[0] / 1e9:8.1f}")
                        if not args.fwd_only:
                            line += f" {times[1]:11.3f} {3.5 * flops / times[1] / 1e9:8.1f}"
                        print(line, flush=True)
                    print(f"{'':9} max |triton - sdpa| = {err:.3g}")
                    del prob, rows
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
