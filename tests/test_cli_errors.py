"""Every user mistake ends in one clear line: a fuzz table of bad inputs through the real `mor` CLI.

Each case checks: a non-zero exit, stderr of exactly one line that starts with `mor` and names the key,
file or flag at fault, and no traceback. Most run `mor_dist.cli.main` in-process (fast); a few run
`python -m mor_dist.cli` to prove the real exit code and stderr.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mor_dist.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny/mor.yaml")

# (override, what the message must name). Every numeric key's range, the cross-key rules, and
# OmegaConf's own refusals (types, unknown keys).
OVERRIDES = [
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1]"),
    ("optim.betas=[0.9,0.95,0.99]", "optim.betas"),
    ("optim.betas=[-0.1,0.9]", "optim.betas[0]"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.eps=-1e-8", "optim.eps"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("checkpoint.interval=0", "checkpoint.interval"),
    ("checkpoint.interval=-5", "checkpoint.interval"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("logging.log_interval=0", "logging.log_interval"),
    ("logging.peak_tflops=0", "logging.peak_tflops"),
    ("data.seq_len=0", "data.seq_len"),
    ("data.seq_len=4096", "data.seq_len"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.prefetch_factor=0", "data.prefetch_factor"),
    ("data.seed=-1", "data.seed"),
    ("data.vocab_size=100", "data.vocab_size"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("data.shard_samples=0", "data.shard_samples"),
    ("data.prepare_workers=-1", "data.prepare_workers"),
    ("data.tokenizer_train_bytes=0", "data.tokenizer_train_bytes"),
    ("data.verify=md5", "data.verify"),
    ("model.head_dim=-2", "model.head_dim"),
    ("model.head_dim=3", "model.head_dim"),
    ("model.vocab_size=0", "model.vocab_size"),
    ("model.d_model=0", "model.d_model"),
    ("model.n_heads=0", "model.n_heads"),
    ("model.n_kv_heads=3", "model.n_kv_heads"),
    ("model.recursions=0", "model.recursions"),
    ("model.rope_theta=inf", "model.rope_theta"),
    ("model.norm_eps=0", "model.norm_eps"),
    ("model.init_std=-0.02", "model.init_std"),
    ("model.d_model=wide", "model.d_model"),
    ("model.d_modle=3", "model.d_modle"),
    ("model=3", "model"),
    ("model.recursions", "model.recursions"),
    ("model.d_model=${nope}", "model.d_model"),
    ("routing.alpha=0", "routing.alpha"),
    ("routing.capacity=[1.0,0.5,1.5]", "routing.capacity[2]"),
    ("routing.capacity=[1.0,0.5]", "routing.capacity"),
    ("routing.aux_loss_coef=-1", "routing.aux_loss_coef"),
    ("routing.z_loss_coef=-0.1", "routing.z_loss_coef"),
    ("routing.balance_coef=-1", "routing.balance_coef"),
    ("routing.bias_update_rate=-0.001", "routing.bias_update_rate"),
    ("routing.capacity_warmup_steps=-1", "routing.capacity_warmup_steps"),
    ("routing.max_depth_warmup_steps=-1", "routing.max_depth_warmup_steps"),
    ("routing.type=expertise", "routing.type"),
    ("schedule.warmup_fraction=1.5", "schedule.warmup_fraction"),
    ("schedule.decay_fraction=-0.1", "schedule.decay_fraction"),
    ("schedule.warmup_fraction=0.9", "schedule.warmup_fraction"),  # + decay_fraction 0.2 > 1
    ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio"),
    ("train.steps=0", "train.steps"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.micro_batch_size=3", "train.global_batch_size"),  # 16 does not split into 3s
    ("train.seed=-1", "train.seed"),
    ("train.eval_interval=-1", "train.eval_interval"),
    ("train.eval_batches=0", "train.eval_batches"),
    ("train.dtype=fp16", "train.dtype"),
    ("parallel.tensor=0", "parallel.tensor"),
    ("parallel.pipeline=0", "parallel.pipeline"),
    ("parallel.zero_stage=4", "parallel.zero_stage"),
    ("parallel.microbatches=-1", "parallel.microbatches"),
    ("parallel.stage_recursions=[1,1]", "parallel.stage_recursions"),
    ("parallel.stage_layers=[1,1]", "parallel.stage_layers"),
    ("parallel.stage_layers=[-1,7]", "parallel.stage_layers"),
]

# name -> file contents: bad YAML configs, each refused naming the file.
YAML_FILES = {
    "syntax.yaml": b"model:\n  d_model: [1, 2\n",
    "dup.yaml": b"model:\n  d_model: 64\n  n_layers: 4\n  d_model: 96\n",
    "dup_group.yaml": b"train:\n  steps: 3\nmodel:\n  d_model: 64\ntrain:\n  steps: 4\n",
    "binary.yaml": bytes(range(256)) * 4,
    "nul.yaml": b"model:\x00\x01\n",
    "base42.yaml": b"base: 42\nmodel:\n  d_model: 64\n",
    "base_list.yaml": b"base: [1, 2]\n",
    "base_missing.yaml": b"base: nothere.yaml\n",
    "loop_a.yaml": b"base: loop_b.yaml\n",
    "loop_b.yaml": b"base: loop_a.yaml\n",
    "list.yaml": b"- model\n- train\n",
    "scalar_group.yaml": b"model: 3\n",
    "unknown.yaml": b"modle:\n  d_model: 64\n",
    "badtype.yaml": b"train:\n  steps: many\n",
    "range.yaml": b"base: " + TINY.encode() + b"\ncheckpoint:\n  interval: 0\n",
}
# What the first line must name besides the file, where there is more to say.
YAML_NAMES = {"dup.yaml": "'d_model'", "dup_group.yaml": "'train'", "base42.yaml": "base",
              "unknown.yaml": "modle", "badtype.yaml": "train.steps", "range.yaml": "checkpoint.interval"}


def run_mor(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(code, err: str, name: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mor") and name in lines[0], err


@pytest.fixture
def no_training(monkeypatch):
    """`mor train` cases must fail while the config loads: reaching the trainer fails the test."""
    def train(*args, **kwargs):
        pytest.fail("training started")

    monkeypatch.setattr("mor_dist.training.main.train", train)


@pytest.fixture(scope="module")
def bad_yaml(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("yaml")
    for name, content in YAML_FILES.items():
        (d / name).write_bytes(content)
    return d


@pytest.mark.parametrize("override, name", OVERRIDES, ids=[o for o, _ in OVERRIDES])
def test_bad_override_info(override, name, capsys):
    assert_one_line(*run_mor(["info", TINY, override], capsys), name)


# Every fourth through `mor train` too: it loads the config the same way, and must stop there.
@pytest.mark.parametrize("override, name", OVERRIDES[::4], ids=[o for o, _ in OVERRIDES[::4]])
def test_bad_override_train(override, name, capsys, no_training):
    assert_one_line(*run_mor(["train", TINY, override], capsys), name)


@pytest.mark.parametrize("file", sorted(YAML_FILES))
def test_bad_yaml(file, bad_yaml, capsys, no_training):
    for command in ("info", "train"):
        code, err = run_mor([command, bad_yaml / file], capsys)
        # Parse errors name the file; a value out of range once merged names its key.
        named = {"base_missing.yaml": "nothere.yaml", "loop_a.yaml": "loop_", "loop_b.yaml": "loop_",
                 "range.yaml": "checkpoint.interval"}.get(file, file)
        assert_one_line(code, err, named)
        assert YAML_NAMES.get(file, "") in err


def test_duplicate_key_names_both_lines(bad_yaml, capsys):
    code, err = run_mor(["info", bad_yaml / "dup.yaml"], capsys)
    assert "line 4: duplicate key 'd_model' (first set on line 2)" in err


@pytest.mark.parametrize("argv, name", [
    (["info"], "config"),
    (["trian", TINY], "trian"),
    (["info", TINY, "--bogus"], "--bogus"),
    (["info", "missing.yaml"], "missing.yaml"),
    (["info", REPO / "configs"], "configs"),
    (["data", "prepare", "--seq-len", "0"], "--seq-len"),
    (["data", "prepare", "--seq-len", "x"], "--seq-len"),
    (["data", "prepare", "--shard-samples", "0"], "--shard-samples"),
    (["data", "prepare", "--val-fraction", "2"], "--val-fraction"),
    (["data", "prepare", "--val-fraction", "nan"], "--val-fraction"),
    (["data", "prepare", "--workers", "-2"], "--workers"),
    (["data", "prepare", "--vocab-size", "10"], "--vocab-size"),
    (["data", "prepare", "--tokenizer-train-bytes", "0"], "--tokenizer-train-bytes"),
    (["data", "prepare", "--set", "data.seq_len=64"], "--set"),
    (["data", "prepare", "--config", TINY, "--set", "data.seq_len=0"], "data.seq_len"),
    (["data", "prepare", "x.txt", "--default-corpus"], "--default-corpus"),
    (["data", "tokenizer", "-o", "t.json", "--vocab-size", "5"], "--vocab-size"),
    (["generate", "run", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "run", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "run", "--prompt", "x", "--seed", "-1"], "--seed"),
    (["generate", "run", "--prompt", "x", "--threads", "-1"], "--threads"),
    (["generate", "run", "--prompt", "x", "--step", "-2"], "--step"),
    (["generate", "run", "--ids", "--prompt", "12,a"], "--prompt"),
    (["generate", "run", "--ids", "--prompt", ","], "--prompt"),
    (["generate", "run"], "--prompt"),
    (["serve-bench", "--config", TINY, "--requests", "0"], "--requests"),
    (["serve-bench", "--config", TINY, "--gen-len", "0"], "--gen-len"),
    (["serve-bench", "--config", TINY, "--prompt-len", "-1"], "--prompt-len"),
    (["serve-bench", "--config", TINY, "--max-requests", "0"], "--max-requests"),
    (["serve-bench", "--config", TINY, "--page-size", "0"], "--page-size"),
    (["serve-bench"], "--config"),
    (["serve-bench", "--config", TINY, "--device", "tpu"], "--device"),
    (["serve-bench", "--config", TINY, "--set", "optim.lr=-1"], "optim.lr"),
    (["export", "run", "-o", "out", "--step", "-1"], "--step"),
], ids=lambda v: " ".join(map(str, v)) if isinstance(v, list) else None)
def test_bad_flags(argv, name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line(*run_mor(argv, capsys), name)


def test_serve_bench_prompt_longer_than_the_model(capsys):
    argv = ["serve-bench", "--config", TINY, "--prompt-len", "250", "--gen-len", "10", "--device", "cpu"]
    assert_one_line(*run_mor(argv, capsys), "--prompt-len/--gen-len")


def test_prepare_bad_inputs(tmp_path, capsys):
    """Non-UTF-8 JSON lines, a parquet text column of ints, a missing input: the file (and line)."""
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), ints)
    for i, (inputs, name) in enumerate([([jsonl], f"{jsonl}:2: not UTF-8"), ([ints], f"{ints}: column 'text'"),
                                        ([tmp_path / "none.txt"], "none.txt")]):
        code, err = run_mor(["data", "prepare", *inputs, "-o", tmp_path / f"ds{i}", "--no-progress"], capsys)
        assert_one_line(code, err, name)


def _in_processes(cases, cwd) -> None:
    """`mor` cases as separate processes, side by side (`mor train` sets up torch.distributed)."""
    procs = [subprocess.Popen([sys.executable, "-m", "mor_dist.cli", *map(str, argv)], cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv, _ in cases]
    for p, (argv, name) in zip(procs, cases):
        _, err = p.communicate(timeout=300)
        assert_one_line(p.returncode, err, name)


def test_output_paths_that_cannot_be_written_are_one_line(tmp_path, capsys):
    """A file where a folder goes (and the reverse), or a folder that cannot be created: named before
    any work is done (they were tracebacks, the tokenizer's after training it), nothing left behind;
    and a first start that fails leaves no run folder (it held an empty train.log and run.lock)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, name in [
        (["data", "prepare", "--config", TINY, "-o", a_file, "--no-progress"], f"{a_file}: is a file, not a folder"),
        (["data", "tokenizer", "-o", tmp_path], f"{tmp_path}: is a folder"),
    ]:
        assert_one_line(*run_mor(argv, capsys), name)
    _in_processes([
        (["train", TINY, f"logging.run_dir={a_file}"], f"{a_file}: is a file, not a folder"),
        (["train", TINY, f"logging.run_dir={a_file / 'sub'}"], f"{a_file / 'sub'}: cannot be created"),
        (["train", TINY, f"logging.run_dir={tmp_path / 'run'}", f"data.dataset_dir={tmp_path / 'nodata'}"],
         "dataset manifest is missing; run `mor data prepare --config CONFIG`"),
    ], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_data_verify_missing_dataset(tmp_path, capsys):
    assert_one_line(*run_mor(["data", "verify", tmp_path / "nothing"], capsys), "nothing: dataset manifest")


@pytest.mark.parametrize("err, name", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.pt"), "/runs/x/model.pt: no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), "/runs/x: permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/config.yaml"), "/ro/config.yaml: read-only file system"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/home/q"), "/home/q: disk quota exceeded"),
])
def test_disk_and_permission_errors_are_one_line(err, name, capsys, monkeypatch):
    """Raised anywhere (here: while `mor info` works), and also when another error was raised from it."""
    def fail(cfg):
        raise err

    monkeypatch.setattr("mor_dist.model.accounting.model_info", fail)
    assert_one_line(*run_mor(["info", TINY], capsys), name)

    def wrapped(cfg):
        raise RuntimeError("basic_ios::clear: iostream error") from err

    monkeypatch.setattr("mor_dist.model.accounting.model_info", wrapped)
    assert_one_line(*run_mor(["info", TINY], capsys), name)


@pytest.mark.parametrize("bug", [KeyError("a bug"), FileNotFoundError(errno.ENOENT, "gone", "x")])
def test_internal_errors_keep_their_traceback(bug, monkeypatch):
    """Anything but a user's mistake, a full disk or a permission propagates with its traceback."""
    def fail(cfg):
        raise bug

    monkeypatch.setattr("mor_dist.model.accounting.model_info", fail)
    with pytest.raises(type(bug)):
        main(["info", TINY])


def test_real_process_exit_code_and_stderr(tmp_path):
    """The installed entry point's behaviour, in separate processes (run side by side)."""
    cases = [
        (["info", TINY, "optim.betas=[0.9]"], "optim.betas"),
        (["train", TINY, "checkpoint.interval=0", f"logging.run_dir={tmp_path / 'run'}"], "checkpoint.interval"),
        (["data", "prepare", "--seq-len", "0"], "--seq-len"),
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "mor_dist.cli", *map(str, argv)], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv, _ in cases]
    for p, (argv, name) in zip(procs, cases):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (argv, err)
        assert_one_line(p.returncode, err, name)
        assert out == ""
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched


def test_info_still_works(capsys):
    assert main(["info", TINY]) == 0
    assert json.loads(capsys.readouterr().out)
