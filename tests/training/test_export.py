"""`mor export` of a single-process run: the tokenizer found as the run found it, whichever folder the
command runs in; the weights readable by whoever may read the other files; mistakes in one line
before the checkpoint is read; stdout of `mor generate RUN --ids` only the result."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

from mor_dist.cli import main
from mor_dist.config import load_config, to_yaml
from mor_dist.inference.loading import load_for_inference
from tests.hf.conftest import trained_run, tiny_dataset  # noqa: F401  (the run folder tests/hf trains)
from tests.training.conftest import run_mor


@contextlib.contextmanager
def caplog_at(level):
    """The records of the `mor` loggers at `level` and above while the block runs."""
    records = []
    handler = logging.Handler(level)
    handler.emit = records.append
    logger = logging.getLogger("mor")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def relative_copy(run: Path, work: Path, dataset: Path, dataset_dir: str | None = None) -> Path:
    """The run as `mor train configs/... logging.run_dir=runs/r data.dataset_dir=<relative>` run in
    `work` would have left it: config.yaml holds both paths relative to `work`."""
    copy = work / "runs" / "r"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "tensorboard", "run.lock"))
    cfg = load_config(copy / "config.yaml")
    cfg.logging.run_dir = "runs/r"
    cfg.data.dataset_dir = dataset_dir or os.path.relpath(dataset, work)
    (copy / "config.yaml").write_text(to_yaml(cfg))
    return copy


def test_export_finds_the_runs_tokenizer_from_any_folder(trained_run, tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    run = relative_copy(trained_run, tmp_path / "work", tiny_dataset)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    old_mask = os.umask(0o027)
    try:
        assert main(["export", str(run), "-o", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old_mask)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (tiny_dataset / "tokenizer.json").read_bytes()
    # safetensors writes 0600; the export follows the umask as its other files do.
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "model.safetensors": 0o640, "config.yaml": 0o640, "tokenizer.json": 0o640, "export.json": 0o640}
    # `mor generate` on the export, and on the run folder itself, encodes text from this folder too.
    assert load_for_inference(out)[1] is not None
    model, tok = load_for_inference(run)
    assert tok is not None and tok.to_str() == load_for_inference(out)[1].to_str()

    # A dataset that is nowhere (a purged scratch folder): the weights still export, without the
    # tokenizer, and the warning says where it was looked for and how to give it.
    lost = relative_copy(trained_run, tmp_path / "work2", tiny_dataset, dataset_dir="gone/ds")
    with caplog_at(logging.WARNING) as records:
        assert main(["export", str(lost), "-o", str(tmp_path / "out2")]) == 0
    said = " ".join(r.getMessage() for r in records)
    assert "the run's tokenizer (gone/ds/tokenizer.json) is not at" in said and "--tokenizer PATH" in said, said
    assert str(tmp_path / "work2" / "gone" / "ds" / "tokenizer.json") in said
    assert (tmp_path / "out2" / "model.safetensors").is_file() and not (tmp_path / "out2" / "tokenizer.json").exists()
    assert main(["export", str(lost), "-o", str(tmp_path / "out3"), "--tokenizer",
                 str(tiny_dataset / "tokenizer.json")]) == 0
    assert (tmp_path / "out3" / "tokenizer.json").read_bytes() == (tiny_dataset / "tokenizer.json").read_bytes()


def test_the_folder_training_ran_in_is_recorded_and_tried_first(trained_run, tiny_dataset, tmp_path):  # noqa: F811
    import json

    from mor_dist.training.export import training_dirs

    meta = json.loads(next((trained_run / "checkpoints").glob("step_*/meta.json")).read_text())
    assert Path(meta["workdir"]).is_dir()
    cfg = load_config(trained_run / "config.yaml")
    assert training_dirs(cfg, trained_run, str(tmp_path))[0] == tmp_path


def test_output_path_mistakes_are_one_line_before_anything_is_read(trained_run, tmp_path, capsys):  # noqa: F811
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out, what in ((afile, "is a file, not a folder"), (afile / "sub", f"lies under {afile}, which is a file")):
        assert main(["export", str(trained_run), "-o", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"mor: {out}: {what}; give -o ") and captured.err.count("\n") == 1, captured.err
        assert "Processing zero checkpoint" not in captured.out + captured.err  # refused before the checkpoint
    assert afile.read_text() == "keep me"


def test_generate_ids_stdout_is_the_result_only(trained_run):  # noqa: F811
    """DeepSpeed's messages (accelerator warning, zero_to_fp32's progress) go to stderr, so the
    output can be piped."""
    r = run_mor(["generate", str(trained_run), "--ids", "--prompt", "5,6", "--max-new-tokens", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.fullmatch(r"\d+,\d+,\d+\n", r.stdout), r.stdout[-2000:]
    assert "Processing zero checkpoint" in r.stderr


def test_export_runs_no_command_a_config_names(trained_run, tiny_dataset, tmp_path):  # noqa: F811
    """A run's config.yaml is data: a `pipe:` dataset location in it is not run to find the tokenizer
    (nor is object storage fetched); the export warns and ships the weights."""
    marker = tmp_path / "RAN"
    run = relative_copy(trained_run, tmp_path / "work", tiny_dataset, dataset_dir=f"pipe:touch {marker}; cat {{}}")
    with caplog_at(logging.WARNING) as records:
        assert main(["export", str(run), "-o", str(tmp_path / "out")]) == 0
    assert not marker.exists()
    assert "not a local path: not fetched" in " ".join(r.getMessage() for r in records)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_export_replaces_links_planted_in_its_folder(trained_run, tmp_path):  # noqa: F811
    """Each file is written beside and renamed into place: a link someone put at its name is
    replaced, the file it pointed at is neither overwritten nor chmodded."""
    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("model.safetensors", "config.yaml", "export.json", "config.json", "modeling_mor.py"):
        victims[name] = tmp_path / f"victim_{name}"
        victims[name].write_text("keep me")
        victims[name].chmod(0o600)
        (out / name).symlink_to(victims[name])
    assert main(["export", str(trained_run), "-o", str(out), "--hf"]) == 0
    for name, victim in victims.items():
        assert victim.read_text() == "keep me" and victim.stat().st_mode & 0o777 == 0o600, name
        assert not (out / name).is_symlink() and (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if ".tmp." in p.name]
