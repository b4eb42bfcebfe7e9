#!/usr/bin/env bash
# One command for a machine with a GPU (under 10 minutes on one): what this project can only show
# on one, written to one JSON file to append to bench/RESULTS.md.
#
#   bash bench/gpu_check.sh [--smoke] [--out FILE]
#
#   1. training: bf16 MoR-360m (Nr=3) vs the vanilla and recursive 360m, tokens/s and MFU, eager and
#      compiled (bench/train_throughput.py --preset configs/paper/360m)
#   2. Triton routed attention vs SDPA (bench/attention.py); the kernel tests and the serving
#      engine's CUDA-graph test on the GPU
#   3. decoding: continuous depth-wise batching vs vanilla, MoR-4 (the paper's headline), bf16,
#      shared-block step compiled with CUDA graphs (bench/inference.py --compile)
#   4. with 2 or more GPUs: the TP / PP / ZeRO equality tests (tests/parallel) on NCCL
#
# Every step runs under its own time limit, and a step that fails or runs out of time is recorded
# (exit code, seconds, the end of its output) while the others still run: a first run on new
# hardware should come back with everything that worked. The report is rewritten after each step,
# so even a check killed from outside leaves what it had. Exit code: 0 when every step passed.
#
# --smoke runs the same steps at toy sizes on whatever is there (CPU in CI), so the script cannot rot.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a file name" >&2; exit 2; }; OUT="$2"; shift ;;
        *) echo "gpu_check.sh: unknown argument $1; use --smoke and/or --out FILE" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OUT=${OUT:-bench/gpu_check-$(date +%Y%m%d-%H%M%S).json}
if ! GPUS=$($PY -c "import torch; print(torch.cuda.device_count())"); then
    echo "gpu_check: '$PY' cannot import torch; install the project first (README)" >&2
    exit 2
fi
echo "gpu_check: $GPUS GPU(s); smoke=$SMOKE; writing $OUT"

if [ "$SMOKE" = 1 ]; then
    TRAIN_ARGS=(--quick --no-compile)
    INFER_ARGS=(--quick --profile-ticks 0)
else
    TRAIN_ARGS=(--preset configs/paper/360m --seq-len 1024 --batch 8 --steps 3 --rounds 3 --warmup 3)
    INFER_ARGS=(--compile --recursions 4 --batch 64 --kv-batch 16 --prompt-len 128 --gen-len 128)
fi

# Seconds per step on a full run: 570 on one GPU (+150 with two or more); the smoke run has no limits.
declare -A LIMIT=([training]=210 [attention]=90 [gpu_tests]=120 [inference]=150 [parallel_tests]=150)

report() {  # the JSON from what the steps left so far
    $PY - "$WORK" "$OUT" "$SMOKE" <<'EOF'
import json, sys, time
from pathlib import Path

import torch

work, out, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
steps = {}
for status in sorted(work.glob("*.status")):
    name = status.stem
    rc, seconds, *skipped = status.read_text().split()
    steps[name] = {"rc": int(rc), "seconds": int(seconds), "passed": rc == "0", "skipped": bool(skipped)}
    if rc != "0":  # 124 or 137: out of time
        steps[name]["output_tail"] = (work / f"{name}.out").read_text(errors="replace").strip().splitlines()[-20:]


def parsed(name):
    """The step's JSON (its last stdout line) when it passed; else where to look."""
    if name not in steps:
        return {"not_run": True}
    if steps[name]["passed"]:
        try:
            return json.loads((work / f"{name}.json").read_text().strip().splitlines()[-1])
        except (OSError, IndexError, ValueError) as e:  # exit 0 but no JSON: a failure all the same
            steps[name].update(passed=False, error=f"no JSON on its stdout ({type(e).__name__})")
    return {"failed": True, "see": f"steps.{name}"}


def text(name, lines=None):
    if name not in steps:
        return "not run"
    body = (work / f"{name}.out").read_text(errors="replace").strip()
    return body.splitlines()[-lines:] if lines else body


inference = parsed("inference")
result = {
    "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
    "gpus": torch.cuda.device_count(),
    "smoke": smoke,
    "steps": steps,
    "training": parsed("training"),
    "attention": text("attention"),
    "gpu_tests": text("gpu_tests", 3),
    "inference": {k: v for k, v in inference.items() if k in (
        "device", "dtype", "fixed_batch_ratio", "kv_budget_ratio", "overhead_share", "failed", "see", "not_run")},
    "parallel_tests": text("parallel_tests", 3),
}
tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps(result, indent=1, default=float))
tmp.replace(out)
sys.exit(3 if any(not s["passed"] for s in steps.values()) else 0)  # 3: a step failed (the report says which)
EOF
}

FAILED=()
REPORT_RC=0
step() {  # step NAME STDOUT_FILE COMMAND...: run it under its limit, record rc and seconds, rewrite the report
    local name=$1 stdout=$2; shift 2
    local limit=${LIMIT[$name]:?gpu_check.sh: no time limit for step $name} start=$SECONDS rc=0
    [ "$SMOKE" = 0 ] || limit=0  # 0: none
    # timeout puts the step in a process group of its own: started in the background and waited
    # for, so that a kill of this script (Ctrl-C, the job's end) reaches it instead of leaving it running.
    if [ "$stdout" = "-" ]; then
        timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.out" 2>&1 &
    else
        timeout --kill-after=10 "$limit" "$@" > "$WORK/$stdout" 2> "$WORK/$name.out" &
    fi
    CHILD=$!
    trap 'kill -TERM $CHILD 2>/dev/null; wait $CHILD; exit 143' INT TERM
    wait $CHILD || rc=$?
    trap - INT TERM
    echo "$rc $((SECONDS - start))" > "$WORK/$name.status"
    if [ "$rc" != 0 ]; then
        FAILED+=("$name")
        case "$rc" in
            124|137) echo "   $name: out of time (${limit} s)" ;;
            *) echo "   $name: failed (exit $rc)" ;;
        esac
    fi
    report_now
}
report_now() {  # REPORT_RC: 0, 3 (written; a step failed, maybe one that exited 0 without its JSON), other: not written
    REPORT_RC=0
    report || REPORT_RC=$?
    [ "$REPORT_RC" = 0 ] || [ "$REPORT_RC" = 3 ] || echo "gpu_check: could not write $OUT" >&2
}
skip() {  # skip NAME WHY
    echo "skipped: $2" > "$WORK/$1.out"
    echo "0 0 skipped" > "$WORK/$1.status"
}

echo "== 1/4 training throughput"
step training training.json $PY bench/train_throughput.py "${TRAIN_ARGS[@]}" --json

echo "== 2/4 routed attention"
if [ "$GPUS" -ge 1 ]; then
    step attention - $PY bench/attention.py
    step gpu_tests - $PY -m pytest -q tests/kernels \
        tests/inference/test_engine.py::test_cuda_graph_ticks_give_the_eager_tokens_with_two_engines_interleaved
else
    skip attention "no GPU: the Triton kernels run compiled only on one (their CPU tests use the interpreter)"
    skip gpu_tests "no GPU"
fi

echo "== 3/4 decoding"
step inference inference.json $PY bench/inference.py "${INFER_ARGS[@]}" --json

echo "== 4/4 parallel equality tests"
if [ "$GPUS" -ge 2 ] && [ "$SMOKE" = 0 ]; then
    step parallel_tests - $PY -m pytest -q tests/parallel
else
    skip parallel_tests "needs 2 GPUs (has $GPUS) and a full run (smoke=$SMOKE)"
fi
report_now

if [ "$REPORT_RC" != 0 ] && [ "$REPORT_RC" != 3 ]; then
    echo "gpu_check: the report could not be written (see above)"
    exit 1
fi
if [ "$REPORT_RC" = 3 ]; then
    echo "gpu_check: wrote $OUT; failed: ${FAILED[*]:-a step that left no JSON} (the report's steps say why)"
    exit 1
fi
echo "gpu_check: wrote $OUT"
