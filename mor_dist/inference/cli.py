"""`mor generate` (a person's prompt) and `mor serve-bench` (synthetic load, tokens/s, KV bytes).

Mistakes raise ConfigError (flags) or CheckpointError (the folder), printed as one line by `mor`.
"""

from __future__ import annotations

import json
import sys

from mor_dist.config import ConfigError, flag_type

SEED = "[0, 4294967295]"


def _token_ids(text: str) -> list[int]:
    ids = []
    for x in text.split(","):
        if x.strip():
            try:
                ids.append(int(x))
            except ValueError:
                raise ConfigError(f"--prompt: {x.strip()!r} is not a token id; with --ids give comma-separated "
                                  "integers, e.g. --prompt 12,7,99") from None
    if not ids:
        raise ConfigError("--prompt: no token ids; give at least one, e.g. --prompt 12,7,99")
    return ids


def _check_fits(model, prompt_len: int, new_tokens: int, flags: str) -> None:
    limit = model.cfg.max_seq_len
    if prompt_len + new_tokens - 1 > limit:
        raise ConfigError(f"{flags}: a prompt of {prompt_len} + {new_tokens} new tokens exceeds the model's "
                          f"max_seq_len={limit}; ask for fewer")


def _generate(args) -> int:
    import torch

    from mor_dist.inference.decode import generate
    from mor_dist.inference.loading import load_for_inference

    torch.set_num_threads(args.threads) if args.threads else None
    given = _token_ids(args.prompt) if args.ids else None  # flag mistakes before the (slow) load
    model, tok = load_for_inference(args.checkpoint, args.step)
    if args.ids:
        prompt, vocab = given, model.cfg.vocab_size
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"--prompt: token id {bad[0]} is outside the model's vocabulary [0, {vocab}); "
                              "fix the ids")
    elif tok is None:
        raise ConfigError(f"--prompt: {args.checkpoint} has no tokenizer.json beside it to encode text; pass token "
                          "ids with --ids")
    else:
        prompt = tok.encode(args.prompt).ids
    if not prompt:
        raise ConfigError("--prompt: empty; give some text")
    _check_fits(model, len(prompt), args.max_new_tokens, "--max-new-tokens")
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
    from mor_dist.inference.serve_bench import DEFAULT_REQUESTS_PER_ROW, MIN_REQUESTS_PER_ROW, serve

    torch.set_num_threads(args.threads) if args.threads else None
    if bool(args.checkpoint) == bool(args.config):
        raise ConfigError("--config: give a checkpoint or --config, exactly one of them")
    cfg = None
    if args.config:
        from mor_dist.config import load_config

        cfg = load_config(args.config, args.overrides)  # its mistakes first (quick)
    rows = args.max_requests
    requests = DEFAULT_REQUESTS_PER_ROW * rows if args.requests is None else args.requests
    if requests < MIN_REQUESTS_PER_ROW * rows:
        raise ConfigError(f"--requests: {requests} requests through {rows} rows (--max-requests) leave no "
                          f"steady-state window to measure (the warm-up takes about 2 per row); give at least "
                          f"{MIN_REQUESTS_PER_ROW * rows} ({MIN_REQUESTS_PER_ROW} per row; default "
                          f"{DEFAULT_REQUESTS_PER_ROW * rows}), or fewer --max-requests")
    if args.device and not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ConfigError(f"--device: {args.device!r} is not cpu or cuda[:N]; use one of those")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device: {args.device} but torch sees no CUDA device; use --device cpu")
    if args.checkpoint:
        model, _ = load_for_inference(args.checkpoint)  # slow: after every flag is checked
    else:
        from mor_dist.model import build_model

        torch.manual_seed(args.seed)
        model = build_model(cfg).eval()  # random weights
    _check_fits(model, args.prompt_len, args.gen_len, "--prompt-len/--gen-len")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    res = serve(model, rows, requests, args.prompt_len, args.gen_len, args.seed,
                compiled=args.compile, kv=args.kv, page_size=args.page_size, prefill_tokens=args.prefill_tokens)
    res["device"], res["compiled"] = device, args.compile
    if not res["steady_state"]:
        print(f"mor: warning: --requests: no request admitted in the steady-state window finished in it, so the "
              f"figures include the warm-up and the drain (steady_state false); raise --requests (now {requests})",
              file=sys.stderr)
    print(json.dumps(res, indent=1))
    return 0


def add_inference_parsers(sub) -> None:
    p = sub.add_parser("generate", help="decode a prompt with the KV caches of the model's routing",
                       description="Loads an export folder (mor export) or a run folder (latest checkpoint), "
                       "encodes --prompt with the tokenizer found beside it and decodes.")
    p.add_argument("checkpoint", help="export folder or run folder")
    p.add_argument("--prompt", required=True, help="text (or comma-separated token ids with --ids)")
    p.add_argument("--ids", action="store_true", help="--prompt holds token ids; print ids")
    p.add_argument("--max-new-tokens", type=flag_type(">= 1"), default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default at temperature 0)")
    p.add_argument("--temperature", type=flag_type(">= 0", float), default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--seed", type=flag_type(SEED), default=0)
    p.add_argument("--step", type=flag_type(">= 0"), help="run folder: checkpoint step (default: latest)")
    p.add_argument("--stats", action="store_true", help="print depths and KV bytes per token to stderr")
    p.add_argument("--threads", type=flag_type(">= 0"), default=0, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("serve-bench", help="synthetic requests through continuous depth-wise batching",
                       description="Serves --requests synthetic prompts (a closed loop: one arrives as one "
                       "finishes) through the engine and prints, as JSON, steady-state decode and prefill "
                       "tokens/s (CPU process time on CPU), TTFT and inter-token latency (p50/p99), block "
                       "fill, recursion depths and KV-cache bytes per token. Give a checkpoint, or --config "
                       "for random weights (throughput only).")
    p.add_argument("checkpoint", nargs="?", help="export folder or run folder")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for --config, e.g. model.recursions=4 (--set KEY=VALUE also works)")
    p.add_argument("--config", help="YAML config for a random-weight model instead of a checkpoint")
    p.add_argument("--requests", type=flag_type(">= 1"), default=None,
                   help="synthetic requests in all (default: 8 x --max-requests; at least 4 x, as the warm-up "
                   "takes about 2 per row and the measured window needs its requests to finish)")
    p.add_argument("--prompt-len", type=flag_type(">= 1"), default=64)
    p.add_argument("--gen-len", type=flag_type(">= 1"), default=64)
    p.add_argument("--max-requests", type=flag_type(">= 1"), default=16,
                   help="concurrent requests: engine rows (a KV-cache row and a shared-block slot each)")
    p.add_argument("--kv", choices=("recursion_wise", "share"), help="KV cache (default: the model's kv.strategy)")
    p.add_argument("--page-size", type=flag_type(">= 1"), default=16, help="KV-cache page size in tokens")
    p.add_argument("--prefill-tokens", type=flag_type(">= 1"), default=256, help="prompt tokens prefilled per tick")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="the shared-block step through torch.compile; on a GPU "
                   "with CUDA graphs (compiled during the warm-up, outside the figures)")
    p.add_argument("--seed", type=flag_type(SEED), default=0)
    p.add_argument("--threads", type=flag_type(">= 0"), default=0)
    p.set_defaults(func=_serve_bench)
