"""bench/gpu_check.sh keeps running: its --smoke mode (toy sizes, whatever device is there) end to
end, writing the JSON a GPU run appends to bench/RESULTS.md."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_smoke_writes_its_report(tmp_path):
    out = tmp_path / "check.json"
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["smoke"] and got["training"]["models"]["mor3"]["eager"]["tokens_per_s"] > 0
    assert got["training"]["models"]["mor3"]["flop_ratio"] > 1
    assert set(got["inference"]["fixed_batch_ratio"]) == {"mor2_rw", "mor2_share", "mor3_rw", "mor3_share"}
    if not got["gpus"]:
        assert "skipped" in got["parallel_tests"][0] and "no GPU" in got["attention"]
    assert all(s["passed"] for s in got["steps"].values()), got["steps"]


def test_gpu_check_goes_on_past_a_failed_step_and_says_which(tmp_path):
    """A step that fails (here the training benchmark, through a Python that refuses to run it) is
    recorded with its exit code and output; the steps after it still run, and one that exits 0
    without its JSON (the decoding benchmark here) counts as failed; the exit code is 1."""
    py = tmp_path / "py"
    py.write_text(f'#!/bin/sh\nif [ "$1" = bench/train_throughput.py ]; then echo "CUDA error: no kernel image" >&2; exit 3; fi\n'
                  f'if [ "$1" = bench/inference.py ]; then exit 0; fi\nexec {sys.executable} "$@"\n')
    py.chmod(0o755)
    out = tmp_path / "check.json"
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", str(out)], cwd=REPO,
                       env={"PYTHON": str(py), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1 and "failed: training" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["steps"]["training"]["rc"] == 3 and not got["steps"]["training"]["passed"]
    assert "CUDA error: no kernel image" in got["steps"]["training"]["output_tail"][-1]
    assert got["training"] == {"failed": True, "see": "steps.training"}
    assert got["steps"]["inference"]["rc"] == 0 and not got["steps"]["inference"]["passed"]
    assert got["steps"]["inference"]["error"].startswith("no JSON") and got["inference"]["failed"]
    assert "parallel_tests" in got["steps"]  # the last step's entry: the run went on to the end
