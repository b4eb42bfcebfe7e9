"""The rendered sbatch script (--dry-run) and the template filler; no cluster needed."""

from __future__ import annotations

import os
import subprocess

import pytest

from mor_dist.cli import main
from mor_dist.launcher.render import TEMPLATE, render, sbatch_quote
from mor_dist.launcher.validate import UserError, time_limit
from tests.launcher.conftest import cli_error

CONFIG = "configs/tiny/mor.yaml"


def dry_run(capsys, *argv) -> str:
    assert main(["submit", CONFIG, *argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def refused(capsys, *argv) -> str:
    return cli_error(capsys, ["submit", CONFIG, *argv, "--dry-run"])


def sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_dry_run_renders_a_gpu_job(capsys, tmp_path):
    run = tmp_path / "run"
    script = dry_run(capsys, "train.steps=100", f"logging.run_dir={run}", "--nodes=4", "--gpus-per-node=8",
                     "--time=24:00:00", "--partition=gpu", "--account=proj", "--signal-lead=120",
                     "--max-restarts=3", "--sbatch=--exclusive")
    assert sbatch_lines(script) == [
        "--job-name=mor-run", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=24:00:00",
        "--partition=gpu", "--account=proj", "--signal=B:USR1@120", "--requeue", "--open-mode=append",
        f"--output={run}/slurm/job-%j.log", f"--chdir={os.getcwd()}", "--exclusive",
    ]
    assert "MAX_RESTARTS=3" in script and "{{" not in script
    assert f"train {(TEMPLATE.parents[1] / CONFIG)} train.steps=100 logging.run_dir={run})" in script
    assert 'srun "$PYTHON" -m mor_dist.launcher.srun_task -- "${TRAIN[@]}" &' in script
    assert "scontrol requeue" in script and "trap forward_usr1 USR1" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not run.exists()  # a dry run writes nothing


def test_dry_run_cpu_job_leaves_out_unset_options(capsys, tmp_path):
    script = dry_run(capsys, f"logging.run_dir={tmp_path / 'r'}", "--nodes=2")
    lines = sbatch_lines(script)
    assert "--nodes=2" in lines and "--ntasks-per-node=1" in lines
    assert not [x for x in lines if x.startswith(("--gpus", "--time", "--partition", "--account", "--cpus"))]


def test_run_dir_with_space_and_percent_is_quoted_for_sbatch_and_bash(capsys, tmp_path):
    run = tmp_path / "my run 100%j"
    script = dry_run(capsys, f"logging.run_dir={run}")
    # sbatch: one argument in quotes; SLURM's --output pattern: a literal '%' is '%%', the job id '%j'.
    assert f'--output="{tmp_path}/my run 100%%j/slurm/job-%j.log"' in sbatch_lines(script)
    assert f"RUN_DIR='{run}'" in script and f"'logging.run_dir={run}')" in script


@pytest.mark.parametrize("value,seconds", [
    ("5", 300), ("5:30", 360), ("1:00:00", 3600), ("1-2", 93600), ("1-2:30", 95400), ("1-2:30:15", 95460),
    ("0", None), ("UNLIMITED", None), ("infinite", None), ("-1", None),
])
def test_time_limit_takes_every_form_sbatch_takes(value, seconds):
    assert time_limit(value) == seconds  # rounded up to minutes, as SLURM does


@pytest.mark.parametrize("argv,flag", [
    (["--time=25h"], "--time"), (["--time=1:2:3:4"], "--time"), (["--time=1-2-3"], "--time"),
    (["--time=-5"], "--time"), (["--time=\uff11\uff10"], "--time"), (["--time="], "--time"),
    (["--time=5"], "--signal-lead"),  # the default 300 s lead is the whole 5 minutes
    (["--time=10", "--signal-lead=600"], "--signal-lead"), (["--signal-lead=0"], "--signal-lead"),
    (["--signal-lead=65536"], "--signal-lead"), (["--signal-lead=5m"], "--signal-lead"),
    (["--nodes=0"], "--nodes"), (["--nodes=two"], "--nodes"), (["--chain=0"], "--chain"),
    (["--max-restarts=-1"], "--max-restarts"), (["--gpus-per-node=-1"], "--gpus-per-node"),
    (["--tasks-per-node=0"], "--tasks-per-node"), (["--cpus-per-task=0"], "--cpus-per-task"),
    (["--partition=gpu a"], "--partition"), (["--partition=gpu,"], "--partition"), (["--account=a,b"], "--account"),
    (["--dependency=afterany"], "--dependency"), (["--dependency=afterok:1,afterany:x"], "--dependency"),
    (["--dependency=before:1"], "--dependency"), (["--dependency=afterok:1,afterany:2?singleton"], "--dependency"),
    (["--sbatch=exclusive"], "--sbatch"), (["--sbatch=--exclusive --qos=high"], "--sbatch"), (["--sbatch=-p gpu"], "--sbatch"),
    (["--job-name=a\tb"], "--job-name"),
])
def test_bad_flags_are_refused_in_one_line(capsys, tmp_path, argv, flag):
    err = refused(capsys, f"logging.run_dir={tmp_path}", *argv)
    assert err.startswith(f"mor: {flag}: ") and "; " in err, err


def test_unusual_but_valid_flags_are_taken(capsys, tmp_path):
    script = dry_run(capsys, f"logging.run_dir={tmp_path}", "--time=5:01", "--signal-lead=300",
                     "--partition=gpu,gpu-long", "--account=proj_1.a", "--dependency=afterok:12:13_2,after:4+10",
                     "--job-name=it's #1", "--sbatch=-Jx", "--sbatch=--comment=two words", "--max-restarts=0")
    lines = sbatch_lines(script)
    assert lines[0] == '--job-name="it\'s #1"' and "--time=5:01" in lines
    assert lines[-1] == '-Jx "--comment=two words"'  # sbatch reads several options on one line
    assert dry_run(capsys, f"logging.run_dir={tmp_path}", "--time=UNLIMITED", "--signal-lead=65535")


def test_bad_config_is_refused_before_queueing(capsys, tmp_path):
    assert "no_such_key" in refused(capsys, "train.no_such_key=1", f"logging.run_dir={tmp_path}")
    assert refused(capsys, f"logging.run_dir={tmp_path}\\x").startswith("mor: logging.run_dir: ")


def test_a_job_that_would_not_resume_is_refused(capsys, tmp_path):
    # Each requeue would set the previous start's checkpoints aside and begin again: an endless loop.
    line = refused(capsys, "checkpoint.resume=false", f"logging.run_dir={tmp_path / 'r'}")
    assert line.startswith("mor: checkpoint.resume: ") and "logging.run_dir" in line
    assert not (tmp_path / "r").exists()


def test_template_mistakes_are_one_line(capsys, tmp_path):
    run = f"logging.run_dir={tmp_path / 'run'}"
    missing, binary, unknown, quoted = (tmp_path / n for n in ("missing", "binary", "unknown", "quoted"))
    binary.write_bytes(b"\xff\xfe{{")
    unknown.write_text("#!/bin/bash\necho {{zzz}}\n")
    quoted.write_text('#!/bin/bash\necho "{{run_dir}}"\n')
    assert refused(capsys, run, f"--template={missing}").startswith(f"mor: {missing}: No such file")
    assert refused(capsys, run, f"--template={binary}").startswith("mor: --template: ")
    assert refused(capsys, run, f"--template={unknown}").startswith(f"mor: {unknown}: uses placeholders")
    assert refused(capsys, run, f"--template={quoted}").startswith(f"mor: {quoted}:2: {{{{run_dir}}}} stands")


def test_damaged_job_record_and_missing_sbatch_are_one_line(capsys, tmp_path, monkeypatch):
    record = tmp_path / "slurm" / "jobs.json"
    record.parent.mkdir()
    record.write_text('[{"job_id": "1"}]')
    assert refused(capsys, f"logging.run_dir={tmp_path}").startswith(f"mor: {record}: is not a job record")
    assert cli_error(capsys, ["status", str(tmp_path)]).startswith(f"mor: {record}: is not a job record")
    record.write_text("{not json")
    assert cli_error(capsys, ["status", str(tmp_path)]).startswith(f"mor: {record}: is not valid JSON")
    assert cli_error(capsys, ["status", str(tmp_path / "nope")]).startswith(
        f"mor: {tmp_path / 'nope'}: is not a run folder")
    monkeypatch.setenv("PATH", str(tmp_path / "no_bin"))
    err = cli_error(capsys, ["submit", CONFIG, f"logging.run_dir={tmp_path / 'run'}"])
    assert err.startswith("mor: sbatch: not found; ")


def test_run_folder_of_another_config_is_refused(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  d_model: 64\n")
    err = refused(capsys, f"logging.run_dir={tmp_path}")
    assert "holds a run with a different config" in err and "model.d_model: 64 in the run folder, 128 now" in err
    assert err.count("\n") == 1  # one line, the differences inside it


def test_render_quotes_for_the_reader_of_each_line():
    values = {"x": "a b", "y": None, "z": ["-c", "d e"], "n": 3}
    template = "a={{x}}\n#SBATCH --p={{ y }}\n#SBATCH --o={{x}} {{z}}\n# {{x}} {{n}}\ncmd {{z}} {{n}}\nb\n"
    assert render(template, values) == "a='a b'\n#SBATCH --o=\"a b\" -c \"d e\"\n# a b 3\ncmd -c 'd e' 3\nb\n"
    assert sbatch_quote('q"u\\o#te') == '"q\\"u\\\\o#te"' and sbatch_quote("plain-1:2") == "plain-1:2"
    assert render("{{z}}", {"z": []}) == "\n"  # an empty list is no value: its line is left out
    with pytest.raises(UserError, match="zzz"):
        render("{{zzz}}", {})
    with pytest.raises(UserError, match="inside quotes"):  # bash would read our quoted word unquoted
        render('echo "run {{x}}"', values)
    with pytest.raises(UserError, match="control character"):
        render("a={{x}}", {"x": "1\n2"})
