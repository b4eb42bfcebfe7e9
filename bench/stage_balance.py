"""Pipeline stage balance of the default plans: slowest stage's training FLOPs over the mean stage's,
for every paper preset at 2, 3 and 4 stages, cut between recursions only and with cuts inside a
recursion allowed (the default). A FLOPs model, not a timing: deterministic, seconds on any machine.

    python bench/stage_balance.py [--json] [--pp 2 3 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mor_dist.config import load_config  # noqa: E402
from mor_dist.parallel.stages import (  # noqa: E402
    describe_plan, recursion_splits, shared_passes, stage_flops, stage_plan,
)

KINDS = ("mor_nr2", "mor_nr3", "mor_nr4", "recursive_nr2", "recursive_nr3", "recursive_nr4")


def imbalance(flops: list[float]) -> float:
    return max(flops) / (sum(flops) / len(flops))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--pp", type=int, nargs="+", default=[2, 3, 4])
    args = p.parse_args(argv)
    rows = []
    for preset in sorted(d.name for d in (REPO / "configs/paper").iterdir() if d.is_dir()):
        for kind in KINDS:
            for pp in args.pp:
                cfg = load_config(REPO / f"configs/paper/{preset}/{kind}.yaml", [f"parallel.pipeline={pp}"])
                nr, block = shared_passes(cfg)
                # Whole recursions only: the best split of the recursions (the mean stage is the same
                # for every plan, so the lightest slowest stage is the least imbalance).
                best_whole = min(imbalance(stage_flops(cfg, [n * block for n in split]))
                                 for split in recursion_splits(nr, pp))
                plan = stage_plan(cfg)
                rows.append({"preset": preset, "model": kind, "pp": pp, "plan": plan,
                             "stages": describe_plan(cfg, plan), "imbalance": imbalance(stage_flops(cfg, plan)),
                             "whole_recursions_imbalance": best_whole})
    if args.json:
        print(json.dumps(rows))
        return 0
    print("| preset | model | PP | default plan (r = recursion, L = block layers) | slowest / mean | "
          "whole recursions only |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['model']} | {r['pp']} | {r['stages']} | {r['imbalance']:.2f} | "
              f"{r['whole_recursions_imbalance']:.2f} |")
    worst = max(r["imbalance"] for r in rows)
    worst_whole = max(r["whole_recursions_imbalance"] for r in rows)
    print(f"\nworst slowest / mean: {worst:.2f} (whole recursions only: {worst_whole:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
