"""One grammar for every `mor` command: key=value overrides anywhere after the config (also after
flags), `--set` as an alias; `mor config`, `--version`; commands that stay light (no torch import)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mor_dist.cli import COMMANDS, build_parser, main
from tests.conftest import REPO
from tests.training.conftest import tiny_dataset, tiny_overrides  # noqa: F401  (the session fixture)

TINY = str(REPO / "configs/tiny/mor.yaml")


def run_mor(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# (argv, the key a bad override must be refused by): the override reached the config, wherever it stood.
GRAMMAR = [
    (["info", TINY, "model.recursions=0"], "model.recursions"),
    (["info", TINY, "--set", "model.recursions=0"], "model.recursions"),
    (["train", TINY, "--force", "train.steps=0"], "train.steps"),
    (["train", TINY, "--dry-run", "--set", "train.steps=0"], "train.steps"),
    (["plan", TINY, "--gpus", "1", "parallel.tensor=0"], "parallel.tensor"),
    (["submit", TINY, "--dry-run", "--nodes", "1", "--set", "train.steps=0"], "train.steps"),
    (["data", "prepare", "--config", TINY, "data.seq_len=0"], "data.seq_len"),
    (["data", "prepare", "--config", TINY, "--set", "data.seq_len=0"], "data.seq_len"),
    (["data", "tokenizer", "-o", "t.json", "--config", TINY, "data.tokenizer_train_bytes=0"],
     "data.tokenizer_train_bytes"),
    (["data", "verify", "--config", TINY, "data.fetch_retries=-1"], "data.fetch_retries"),
    (["serve-bench", "--config", TINY, "model.recursions=0", "--requests", "1"], "model.recursions"),
    (["serve-bench", "--config", TINY, "--set", "model.recursions=0"], "model.recursions"),
    (["data", "prepare", "data.seq_len=64"], "data.seq_len=64"),  # no config to apply it to
]


@pytest.mark.parametrize("argv, key", GRAMMAR, ids=[" ".join(a[:1] + a[2:]) for a, _ in GRAMMAR])
def test_overrides_anywhere_and_with_set(argv, key, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_mor(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"mor: {key}"), (code, err)


def test_config_prints_the_resolved_yaml(capsys, tmp_path):
    code, out, _ = run_mor(["config", TINY, "train.steps=7", "--set", "model.recursions=4",
                            "model.n_layers=10"], capsys)
    assert code == 0
    tree = yaml.safe_load(out)
    assert tree["train"]["steps"] == 7 and tree["model"]["recursions"] == 4 and tree["routing"]["type"] == "expert"
    # The printed YAML is a complete config: it loads back to itself.
    (tmp_path / "resolved.yaml").write_text(out)
    assert run_mor(["config", tmp_path / "resolved.yaml"], capsys)[1] == out


def test_the_help_table_is_the_parsers_help():
    """`mor --help` lists commands from a table (so it imports none of them): it says what they say."""
    parser = build_parser("*")
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {c.dest: c.help for c in sub._choices_actions} == {name: h for name, (_, _, h) in COMMANDS.items()}


def _light(argv: list[str]) -> tuple[str, bool]:
    """Run `mor ARGV` in a fresh interpreter: (its output, whether torch got imported)."""
    code = ("import sys\nfrom mor_dist.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=REPO)
    return r.stdout + r.stderr, "torch imported" in r.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["status", "no-such-run"]], ids=str)
def test_light_commands_do_not_import_torch(argv):
    out, torch_imported = _light(argv)
    assert not torch_imported, out
    if argv == ["--version"]:
        assert out.startswith("mor_dist 0.") and "torch 2.13.0" in out, out


def test_submit_dry_run_does_not_import_torch(tmp_path):
    out, torch_imported = _light(["submit", TINY, "--dry-run", f"logging.run_dir={tmp_path / 'run'}"])
    assert "#SBATCH" in out and not torch_imported, out


def test_train_dry_run_checks_everything_and_writes_nothing(tiny_dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", TINY, "--dry-run", *tiny_overrides(tiny_dataset, run_dir), "parallel.tensor=2"]
    code, out, err = run_mor(argv, capsys)
    assert code == 0, err
    resolved, summary = out.split("\n---\n")
    assert yaml.safe_load(resolved)["data"]["dataset_dir"] == str(tiny_dataset)
    for line in ("layout      world 2 = tensor 2 x data 1 x pipeline 1", "memory      peak per rank",
                 "validation split found", f"run folder  {run_dir}: new run", "nothing started, nothing written"):
        assert line in summary, summary
    assert not run_dir.exists()
    # What a start refuses, the dry run refuses the same way: a dataset made for another vocabulary.
    code, out, err = run_mor([*argv, "model.vocab_size=1024"], capsys)
    assert code == 2 and err.startswith("mor: model.vocab_size: 1024 differs from the dataset's tokenizer"), err
