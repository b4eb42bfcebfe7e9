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
