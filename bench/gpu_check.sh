#!/usr/bin/env bash
# One command for a machine with a GPU (about 10 minutes on one): what this project can only show on
# one, written to one JSON file to append to bench/RESULTS.md.
#
#   bash bench/gpu_check.sh [--smoke] [--out FILE]
#
#   1. training: bf16 MoR-360m (Nr=3) vs the vanilla and recursive 360m, tokens/s and MFU, eager and
#      compiled (bench/train_throughput.py --preset configs/paper/360m)
#   2. Triton routed attention vs SDPA (bench/attention.py) and the kernel tests on the GPU
#   3. decoding: continuous depth-wise batching vs vanilla, bf16, shared-block step under CUDA graphs
#      (bench/inference.py --compile)
#   4. with 2 or more GPUs: the TP / PP / ZeRO equality tests (tests/parallel) on NCCL
#
# --smoke runs the same steps at toy sizes on whatever is there (CPU in CI), so the script cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) OUT="$2"; shift ;;
        *) echo "gpu_check.sh: unknown argument $1; use --smoke and/or --out FILE" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OUT=${OUT:-bench/gpu_check-$(date +%Y%m%d-%H%M%S).json}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "gpu_check: $GPUS GPU(s); smoke=$SMOKE; writing $OUT"

if [ "$SMOKE" = 1 ]; then
    TRAIN_ARGS=(--quick --no-compile)
    INFER_ARGS=(--quick --profile-ticks 0)
else
    TRAIN_ARGS=(--preset configs/paper/360m --seq-len 1024 --batch 8 --steps 3 --rounds 3 --warmup 3)
    INFER_ARGS=(--compile --batch 64 --kv-batch 16 --prompt-len 128 --gen-len 128)
fi

echo "== 1/4 training throughput"
$PY bench/train_throughput.py "${TRAIN_ARGS[@]}" --json > "$WORK/train.json"

echo "== 2/4 routed attention"
if [ "$GPUS" -ge 1 ]; then
    $PY bench/attention.py > "$WORK/attention.txt"
    $PY -m pytest -q tests/kernels > "$WORK/kernels.txt" 2>&1 || true
else
    echo "no GPU: the Triton kernels run compiled only on one (their CPU tests use the interpreter)" > "$WORK/attention.txt"
    echo "skipped: no GPU" > "$WORK/kernels.txt"
fi

echo "== 3/4 decoding"
$PY bench/inference.py "${INFER_ARGS[@]}" --json > "$WORK/inference.json"

echo "== 4/4 parallel equality tests"
if [ "$GPUS" -ge 2 ] && [ "$SMOKE" = 0 ]; then
    $PY -m pytest -q tests/parallel > "$WORK/parallel.txt" 2>&1 || true
else
    echo "skipped: needs 2 GPUs (has $GPUS) and a full run (smoke=$SMOKE)" > "$WORK/parallel.txt"
fi

$PY - "$WORK" "$OUT" "$SMOKE" <<'EOF'
import json, sys, time
from pathlib import Path

import torch

work, out, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
last = lambda name: json.loads((work / name).read_text().strip().splitlines()[-1])  # noqa: E731
tail = lambda name: (work / name).read_text().strip().splitlines()[-3:]  # noqa: E731
result = {
    "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
    "gpus": torch.cuda.device_count(),
    "smoke": smoke,
    "training": last("train.json"),
    "attention": (work / "attention.txt").read_text(),
    "kernel_tests": tail("kernels.txt"),
    "inference": {k: v for k, v in last("inference.json").items() if k in (
        "device", "dtype", "fixed_batch_ratio", "kv_budget_ratio", "overhead_share")},
    "parallel_tests": tail("parallel.txt"),
}
out.write_text(json.dumps(result, indent=1, default=float))
print(f"gpu_check: wrote {out}")
EOF
