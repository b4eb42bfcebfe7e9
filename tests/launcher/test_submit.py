"""The rendered sbatch script (--dry-run) and the template filler; no cluster needed."""

from __future__ import annotations

import os
import subprocess

import pytest

from mor_dist.cli import main
from mor_dist.launcher.render import TEMPLATE, render

CONFIG = "configs/tiny/mor.yaml"


def dry_run(capsys, *argv) -> str:
    assert main(["submit", CONFIG, *argv, "--dry-run"]) == 0
    return capsys.readouterr().out


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


def test_bad_config_is_refused_before_queueing(capsys, tmp_path):
    assert main(["submit", CONFIG, "train.no_such_key=1", f"logging.run_dir={tmp_path}", "--dry-run"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_run_folder_of_another_config_is_refused(capsys, tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  d_model: 64\n")
    assert main(["submit", CONFIG, f"logging.run_dir={tmp_path}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config" in err and "model.d_model: 64 in the run folder, 128 now" in err


def test_render_drops_lines_without_value_and_refuses_unknown_placeholders():
    assert render("a={{x}}\n#SBATCH --p={{ y }}\nb\n", {"x": 1, "y": None}) == "a=1\nb\n"
    with pytest.raises(KeyError, match="zzz"):
        render("{{zzz}}", {})
