from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mor_dist.cli import main
from mor_dist.data_pipeline.manifest import load_manifest
from mor_dist.data_pipeline.tokenizer import file_fingerprint

REPO_CONFIG = str(Path(__file__).resolve().parents[2] / "configs/tiny/mor.yaml")


def run(argv) -> int:
    return main([str(a) for a in argv])


def test_prepare_mixed_inputs_then_verify(tmp_path, capsys, text_files, tokenizer_file):
    lines = text_files[0].read_text(encoding="utf-8").splitlines()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:400]))
    pq.write_table(pa.table({"text": lines[400:900]}), tmp_path / "in" / "b.parquet")
    out = tmp_path / "ds"
    code = run(["data", "prepare", str(tmp_path / "in"), "-o", str(out), "--seq-len", "16", "--tokenizer",
                str(tokenizer_file), "--shard-samples", "64", "--val-fraction", "0.1", "--workers", "2",
                "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    m = load_manifest(out)
    assert summary["splits"]["train"]["samples"] == m.data["splits"]["train"]["samples"] > 64
    assert m.data["corpus"]["documents"] == sum(1 for t in lines[:900] if t)  # one per non-empty line/row
    assert m.seq_len == 16 and m.tokenizer["fingerprint"] == file_fingerprint(tokenizer_file)

    assert run(["data", "verify", str(out), "--read-samples"]) == 0
    shard = out / m.shards("train")[1]["file"]
    blob = bytearray(shard.read_bytes())
    blob[700] ^= 1
    shard.write_bytes(bytes(blob))
    assert run(["data", "verify", str(out)]) == 1
    assert f"{shard}: shard sha256" in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert run(["data", "prepare", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"mor: {tmp_path / 'missing.txt'}: input file or directory does not exist\n"


def test_tokenizer_command_with_config(tmp_path, capsys, text_files):
    out = tmp_path / "tok.json"
    code = run(["data", "tokenizer", *map(str, text_files), "-o", str(out), "--config", REPO_CONFIG,
                "--set", "model.vocab_size=300", "--set", "data.vocab_size=300"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 300 and info["fingerprint"] == file_fingerprint(out)


def test_prepare_with_config_trains_at_the_model_vocabulary(tmp_path, capsys, text_files, tokenizer_file):
    args = ["data", "prepare", *map(str, text_files[:1]), "--seq-len", "16", "--no-progress", "--config", REPO_CONFIG]
    # data.vocab_size unset: the model's size is used.
    code = run([*args, "-o", tmp_path / "a", "--set", "model.vocab_size=300", "--set", "data.vocab_size=null"])
    assert code == 0, capsys.readouterr().err
    assert load_manifest(tmp_path / "a").tokenizer["vocab_size"] == 300
    capsys.readouterr()
    # Any other size, asked for or given as a tokenizer, is refused with both numbers.
    assert run([*args, "-o", tmp_path / "b", "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mor: --vocab-size: 300 differs from model.vocab_size=4096 of ") and err.count("\n") == 1
    assert run([*args, "-o", tmp_path / "c", "--tokenizer", tokenizer_file]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mor: {tokenizer_file}: the tokenizer has 512 tokens, model.vocab_size of ")
    assert "is 4096; set model.vocab_size=512" in err and not (tmp_path / "c").exists()


def test_training_refuses_a_dataset_for_another_vocabulary(dataset, tmp_path):
    """Smaller or larger than the model's: refused before anything is built, naming both sizes."""
    import subprocess
    import sys

    from tests.training.conftest import REPO, mor_env, tiny_overrides

    procs = {}
    for size in (500, 600):
        argv = ["train", REPO_CONFIG, *tiny_overrides(dataset.dir, tmp_path / f"run{size}", model__vocab_size=size)]
        procs[size] = subprocess.Popen([sys.executable, "-m", "mor_dist.cli", *argv], cwd=REPO, env=mor_env(),
                                       text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for size, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-2000:]
        assert err.startswith(f"mor: model.vocab_size: {size} differs from the dataset's tokenizer "
                              f"({dataset.dir / 'tokenizer.json'}: 512 tokens); set model.vocab_size=512"), err
        assert err.count("\n") == 1 and not (tmp_path / f"run{size}" / "config.yaml").exists()


def test_prepare_refuses_a_url_as_output(tmp_path, capsys, text_files, tokenizer_file):
    code = run(["data", "prepare", text_files[0], "-o", "https://host/web", "--tokenizer", tokenizer_file])
    assert code == 2
    assert capsys.readouterr().err.startswith("mor: https://host/web: prepare writes a local directory; give a path")
