"""bench/inference.py keeps running: its --quick mode end to end, its JSON complete."""

import json
import statistics
import subprocess
import sys

from tests.conftest import REPO


def test_inference_benchmark_quick_mode_reports_every_ratio():
    r = subprocess.run([sys.executable, "bench/inference.py", "--quick", "--json"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    names = {"mor2_rw", "mor2_share", "mor3_rw", "mor3_share"}  # --quick: Nr = 2, 3
    for key in ("fixed_batch_ratio", "kv_budget_ratio", "fixed_batch_paired_ratio", "kv_budget_paired_ratio"):
        assert set(out[key]) == names and all(v > 0 for v in out[key].values()), out[key]
    van, mor = out["kv_budget"]["vanilla"]["rounds"], out["kv_budget"]["mor3_share"]["rounds"]  # pairs by cycle
    assert out["kv_budget_paired_ratio"]["mor3_share"] == statistics.median(m / v for m, v in zip(mor, van))
    for setting in ("fixed_batch", "kv_budget"):
        runs = {name: res for name, res in out[setting].items() if isinstance(res, dict)}
        for name, res in runs.items():
            assert res["n"] >= 2 and res["decode_tokens_per_s"] > 0 and res["measured_ticks"] > 0, (setting, name)
        # Lockstep: every model measured over the same number of rounds (the same stretch of time).
        assert len({len(res["rounds"]) for res in runs.values()}) == 1, {n: len(r["rounds"]) for n, r in runs.items()}
    # Sharing keeps recursion 1's K/V only: exactly 1/Nr of the recursion layers' entries.
    assert abs(out["kv_bytes_per_token"]["mor3_share"]["recursion_layers"] - 1 / 3) < 1e-9
    assert 0 <= out["overhead_share"]["mor2_rw"] <= 1
    for name in names:  # the ratio next to the compute ceiling at the depth each model took
        c = out["compute_ceiling"][name]
        assert c["target_depth"] == (int(name[3]) + 1) / 2 and 1.0 <= c["mean_depth"] <= int(name[3])
        assert c["ceiling"] > 1 and abs(c["of_ceiling"] * c["ceiling"] - out["fixed_batch_ratio"][name]) < 1e-9


def test_quick_mode_sizes_only_what_the_command_line_leaves_unset():
    """`--quick --recursions 4` benchmarks Nr = 4 (gpu_check's smoke run passes options next to it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("inference_bench", REPO / "bench/inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    quick = bench.parse_args(["--quick"])
    assert quick.recursions == [2, 3] and quick.d_model == 128 and quick.profile_ticks == 2
    mine = bench.parse_args(["--quick", "--recursions", "3", "--profile-ticks", "0", "--batch", "4"])
    assert mine.recursions == [3] and mine.profile_ticks == 0 and mine.batch == 4 and mine.d_model == 128
