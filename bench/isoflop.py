"""IsoFLOP comparison at CPU scale: vanilla, recursive and MoR trained for one FLOPs budget on the
default corpus, then scored the way the paper scores (validation NLL, few-shot accuracy).

    python bench/isoflop.py [--vanilla-steps 120] [--shots 2] [--out runs/isoflop]

1. `mor data prepare --config configs/tiny/mor.yaml` unless its dataset (data/tiny: this Python's
   standard-library sources, 4096-token BPE, 128-token samples) is there.
2. Budget = --vanilla-steps x tokens per step x vanilla's training FLOPs per token (or --flops-budget).
3. `mor train` configs/tiny/{vanilla,recursive,mor}.yaml with train.flops_budget=BUDGET, each into
   OUT/<name> (`tensorboard --logdir OUT` shows the three side by side). The recursive model has
   vanilla's FLOPs per token (same effective depth, 1 + 2x3 + 1 layers, a third of the parameters);
   MoR (expert-choice, Nr=3, capacities 1, 2/3, 1/3) spends fewer per token and trains on more.
   A finished run with the same config is reused; a different config in OUT is refused by `mor train`.
4. Validation NLL: mean next-token loss over the validation split, in causal mode (the routing
   decisions inference makes).
5. Few-shot accuracy: `mor eval` machinery (lm-evaluation-harness through the Hugging Face export) on
   an offline task built from the validation split -- given a few lines of held-out code, which of 4
   lines comes next (3 taken from other passages); --shots solved examples in front. Also logged to
   each run's TensorBoard as eval/<task>/acc.
Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("vanilla", "recursive", "mor")
TASK = "isoflop_next_line"


def sh(args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "mor_dist.cli", *args], cwd=REPO, env=env)
    if r.returncode:
        sys.exit(f"bench/isoflop.py: `mor {' '.join(args)}` exited with {r.returncode}")


def val_samples(cfg, limit: int):
    import numpy as np

    from mor_dist.data_pipeline.loader import TokenDataset

    ds = TokenDataset(cfg.data.dataset_dir, "val")
    out = []
    for k in range(len(ds.shards)):
        reader = ds.reader(k)
        out += [np.asarray(reader.read(i)) for i in range(reader.samples)]
        if len(out) >= limit:
            break
    return np.stack(out[:limit])


def val_nll(run_dir: Path, samples, batch: int = 16) -> float:
    """Mean next-token loss over the samples, causal routing."""
    import torch

    from mor_dist.inference.loading import load_for_inference

    model, _ = load_for_inference(run_dir)
    x = torch.as_tensor(samples, dtype=torch.long)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            b = x[i:i + batch]
            total += float(model(b[:, :-1], targets=b[:, 1:], mode="causal").lm_loss) * len(b)
    return total / len(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vanilla-steps", type=int, default=120, help="the budget, as steps of the vanilla model")
    ap.add_argument("--flops-budget", type=float, help="training FLOPs (overrides --vanilla-steps)")
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--docs", type=int, default=100, help="task documents (at most one per validation sample)")
    ap.add_argument("--out", default="runs/isoflop")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from mor_dist.config import load_config
    from mor_dist.data_pipeline.tokenizer import load_tokenizer
    from mor_dist.evaluation.harness import evaluate
    from mor_dist.evaluation.tasks import next_line_docs, write_mc_task
    from mor_dist.model.accounting import count_parameters, train_flops_per_token

    out = (REPO / args.out).resolve()
    configs = {m: f"configs/tiny/{m}.yaml" for m in MODELS}
    base = load_config(configs["vanilla"])
    if not (REPO / base.data.dataset_dir / "manifest.json").is_file():
        sh(["data", "prepare", "--config", configs["mor"]])
    per_step = base.train.global_batch_size * base.data.seq_len
    budget = args.flops_budget or args.vanilla_steps * per_step * train_flops_per_token(base)

    # The offline task, from held-out text: one passage per validation sample.
    samples = val_samples(base, 10_000)
    tok = load_tokenizer(REPO / base.data.dataset_dir / "tokenizer.json")
    passages = [tok.decode(s.tolist()) for s in samples]
    docs = next_line_docs(passages, args.docs + 4 * args.shots, choices=4, context_lines=3, seed=0)
    write_mc_task(out / "task", TASK, docs[4 * args.shots:], docs[:4 * args.shots])

    rows = []
    for name in MODELS:
        run_dir = out / name
        overrides = [f"train.flops_budget={budget!r}", f"logging.run_dir={run_dir}", "train.eval_interval=0",
                     "checkpoint.interval=100000"]
        cfg = load_config(REPO / configs[name], overrides)
        sh(["train", configs[name], *overrides])
        nll = val_nll(run_dir, samples)
        res = evaluate(run_dir, [TASK], num_fewshot=args.shots, include_paths=[str(out / "task")])
        metrics = res["results"][TASK]
        rows.append({
            "model": name, "non_embedding_params": count_parameters(cfg)["non_embedding"],
            "steps": cfg.train.steps, "tokens": cfg.train.steps * per_step,
            "train_flops": cfg.train.steps * per_step * train_flops_per_token(cfg),
            "val_nll": nll, "acc": metrics["acc,none"], "acc_stderr": metrics["acc_stderr,none"],
            "acc_norm": metrics["acc_norm,none"],
        })

    n_docs = len(docs) - 4 * args.shots
    print(f"\nbudget {budget:.4g} training FLOPs; validation: {len(samples)} samples x {base.data.seq_len} "
          f"tokens; task: {n_docs} docs, 4 choices, {args.shots}-shot (chance 0.25)\n")
    print("| model | non-emb params | steps | tokens | train FLOPs | val NLL (causal) | acc | acc_norm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['non_embedding_params'] / 1e6:.2f}M | {r['steps']} | {r['tokens'] / 1e6:.2f}M | "
              f"{r['train_flops']:.3g} | {r['val_nll']:.4f} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} | "
              f"{r['acc_norm']:.3f} |")
    (out / "isoflop.json").write_text(json.dumps({"budget": budget, "rows": rows}, indent=1) + "\n")
    print(f"\n{out / 'isoflop.json'}; TensorBoard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
