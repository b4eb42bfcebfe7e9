"""`mor generate` and `mor serve-bench` on a tiny export folder."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mor_dist.cli import main
from mor_dist.config import load_config, to_yaml
from mor_dist.inference.decode import generate
from mor_dist.inference.loading import load_for_inference
from mor_dist.inference.serve_bench import serve
from tests.inference.helpers import tiny_model


def export_folder(tmp_path):
    model = tiny_model("mor_expert")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.yaml").write_text(to_yaml(load_config("configs/tiny/mor.yaml")))
    return model


def test_generate_ids_from_export_folder(tmp_path, capsys):
    model = export_folder(tmp_path)
    loaded, tok = load_for_inference(tmp_path)
    assert tok is None
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert main(["generate", str(tmp_path), "--ids", "--prompt", "5,6,7,8", "--max-new-tokens", "6", "--stats"]) == 0
    out = capsys.readouterr()
    want = generate(model, [5, 6, 7, 8], 6)["tokens"]
    assert out.out.strip() == ",".join(map(str, want))
    assert json.loads(out.err.strip().splitlines()[-1])["new_tokens"] == 6


def test_generate_needs_tokenizer_or_ids(tmp_path, capsys):
    export_folder(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "hello"]) == 2
    assert "--ids" in capsys.readouterr().err


def test_serve_bench_random_weights(capsys):
    args = ["serve-bench", "--config", "configs/tiny/mor.yaml", "--requests", "12", "--prompt-len", "8",
            "--gen-len", "6", "--max-requests", "2", "--device", "cpu"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["requests_finished"] >= 12 - 2 and res["steady_state"] and res["measured_ticks"] > 0
    assert res["decode_tokens_per_s"] > 0 and res["prefill_tokens_per_s"] > 0 and len(res["depth_hist"]) == 4
    assert res["ttft_p50_s"] <= res["ttft_p99_s"] and res["itl_p50_s"] <= res["itl_p99_s"]


def test_serve_bench_defaults_measure_a_steady_state(capsys):
    """The README's invocation, bare: --requests defaults to 8 x --max-requests (16 rows), so requests
    admitted after the warm-up finish while others wait, and every figure comes from them."""
    assert main(["serve-bench", "--config", "configs/tiny/mor.yaml", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert res["steady_state"] and "warning" not in out.err
    assert res["rows"] == 16 and res["requests_finished"] <= 8 * 16
    assert res["requests_measured"] >= 16 and res["measured_ticks"] > 64  # longer than one request's life
    assert 0 < res["ttft_p50_s"] <= res["ttft_p99_s"] and 0 < res["itl_p50_s"] <= res["itl_p99_s"]
    assert sum(res["depth_hist"]) == pytest.approx(1.0) and res["kv_bytes_per_token"] > 0


@pytest.mark.parametrize("flags, least", [
    (["--requests", "32"], 64),  # the old default, through the default 16 rows
    (["--requests", "8", "--max-requests", "4"], 16),
    (["--requests", "7", "--max-requests", "2"], 8),
])
def test_serve_bench_refuses_too_few_requests(flags, least, capsys):
    """Too few requests for the rows leave no window whose requests finish: refused in one line, before
    any load, rather than nulls reported as a steady state."""
    assert main(["serve-bench", "--config", "configs/tiny/mor.yaml", "--device", "cpu", *flags]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("mor: --requests: ") and out.err.count("\n") == 1, out.err
    assert f"give at least {least} " in out.err and "--max-requests" in out.err


def test_serve_without_a_steady_state_says_so():
    """serve() itself (no CLI check): too few requests, the drain is measured, with steady_state False
    rather than empty figures."""
    model = tiny_model("mor_expert")
    res = serve(model, 2, 3, 8, 6)
    assert not res["steady_state"] and res["requests_finished"] == 3 and res["requests_measured"] > 0
    assert res["ttft_p50_s"] is not None and res["kv_bytes_per_token"] > 0 and sum(res["depth_hist"]) > 0
    assert serve(model, 2, 8, 8, 6)["steady_state"]  # 4 per row: enough


def test_serve_bench_compiled_block_step(capsys):
    """--compile: the shared-block step compiled (CUDA graphs on a GPU), the figures as eager's."""
    args = ["serve-bench", "--config", "configs/tiny/mor.yaml", "--requests", "8", "--prompt-len", "8",
            "--gen-len", "6", "--max-requests", "2", "--device", "cpu", "--compile"]
    from torch._dynamo.utils import counters

    counters.clear()
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["compiled"] and res["steady_state"] and res["decode_tokens_per_s"] > 0
    assert counters["stats"]["unique_graphs"] >= 1  # the step was compiled, not run eager


def test_damaged_export_is_refused_in_one_line(tmp_path, capsys):
    export_folder(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    for damage in (data[: len(data) // 2], b""):
        weights.write_bytes(damage)
        assert main(["generate", str(tmp_path), "--ids", "--prompt", "5,6"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mor: {weights}: not a readable safetensors file") and err.count("\n") == 1, err
    # Weights of another shape than config.yaml says: named, not a size-mismatch traceback.
    weights.write_bytes(data)
    (tmp_path / "config.yaml").write_text(to_yaml(load_config("configs/tiny/mor.yaml", ["model.d_model=64"])))
    assert main(["generate", str(tmp_path), "--ids", "--prompt", "5,6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mor: {weights}: does not fit {tmp_path / 'config.yaml'}") and "other shapes" in err, err
