"""`mor generate` (a person's prompt) and `mor serve-bench` (synthetic load, tokens/s, KV bytes)."""

from __future__ import annotations

import json
import sys


def _generate(args) -> int:
    import torch

    from mor_dist.inference.decode import generate
    from mor_dist.inference.loading import load_for_inference

    torch.set_num_threads(args.threads) if args.threads else None
    model, tok = load_for_inference(args.checkpoint, args.step)
    if args.ids:
        prompt = [int(x) for x in args.prompt.split(",") if x.strip()]
    elif tok is None:
        print("mor generate: no tokenizer.json beside the checkpoint; pass token ids with --ids", file=sys.stderr)
        return 2
    else:
        prompt = tok.encode(args.prompt).ids
    eos = tok.token_to_id("<|endoftext|>") if tok is not None else None
    temperature = 0.0 if args.greedy else args.temperature
    out = generate(model, prompt, args.max_new_tokens, temperature=temperature, eos=eos, seed=args.seed)
    ids = out["tokens"][:-1] if eos is not None and out["tokens"] and out["tokens"][-1] == eos else out["tokens"]
    print(",".join(map(str, ids)) if args.ids or tok is None else tok.decode(ids))
    if args.stats:
        nr = model.layout.recursions
        new = out["depths"][len(prompt):]
        print(json.dumps({
            "prompt_tokens": len(prompt), "new_tokens": len(out["tokens"]),
            "depth_hist_new_tokens": [new.count(i) for i in range(nr + 1)],
            "kv_bytes_per_token": out["kv_bytes_per_token"],
        }), file=sys.stderr)
    return 0


def _serve_bench(args) -> int:
    import torch

    from mor_dist.inference.loading import load_for_inference
    from mor_dist.inference.serve_bench import serve, synthetic_prompts

    torch.set_num_threads(args.threads) if args.threads else None
    if bool(args.checkpoint) == bool(args.config):
        print("mor serve-bench: give a checkpoint or --config (not both)", file=sys.stderr)
        return 2
    if args.checkpoint:
        model, _ = load_for_inference(args.checkpoint)
    else:
        from mor_dist.config import load_config
        from mor_dist.model import build_model

        torch.manual_seed(args.seed)
        model = build_model(load_config(args.config, args.overrides)).eval()  # random weights
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    prompts = synthetic_prompts(args.requests, args.prompt_len, model.cfg.vocab_size, args.seed)
    res = serve(model, prompts, args.gen_len, args.slots or args.max_requests, args.max_requests)
    res["device"] = device
    print(json.dumps(res, indent=1))
    return 0


def add_inference_parsers(sub) -> None:
    p = sub.add_parser("generate", help="decode a prompt with the KV caches of the model's routing",
                       description="Loads an export folder (mor export) or a run folder (latest checkpoint), "
                       "encodes --prompt with the tokenizer found beside it and decodes.")
    p.add_argument("checkpoint", help="export folder or run folder")
    p.add_argument("--prompt", required=True, help="text (or comma-separated token ids with --ids)")
    p.add_argument("--ids", action="store_true", help="--prompt holds token ids; print ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default at temperature 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="run folder: checkpoint step (default: latest)")
    p.add_argument("--stats", action="store_true", help="print depths and KV bytes per token to stderr")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("serve-bench", help="synthetic requests through continuous depth-wise batching",
                       description="Serves --requests synthetic prompts with the depth-wise batcher and prints "
                       "tokens/s, slot fill, recursion depths and KV-cache bytes per token as JSON. Give a "
                       "checkpoint, or --config for random weights (throughput only).")
    p.add_argument("checkpoint", nargs="?", help="export folder or run folder")
    p.add_argument("--config", help="YAML config for a random-weight model instead of a checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotlist override for --config, repeatable, e.g. --set model.recursions=4")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--max-requests", type=int, default=16, help="concurrent requests (KV-cache rows)")
    p.add_argument("--slots", type=int, default=0, help="shared-block slots (default: --max-requests)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=_serve_bench)
