"""Shell-injection payloads in every value `mor submit` writes into the sbatch script: each is either
refused with one line naming the flag, or ends up as data. The rendered script is run by bash with
srun and scontrol stubbed out, so whatever bash would execute of it does execute here."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO
from tests.launcher.conftest import cli_error, run_cli

CONFIG = str(REPO / "configs" / "tiny" / "mor.yaml")
COMMAND = "touch PWNED"
PAYLOADS = {
    "newline": f"x\n{COMMAND}",
    "crlf": f"x\r\n{COMMAND}",
    "line-separator": f"x\u2028{COMMAND}",  # a line break to Python's splitlines
    "comment-then-newline": f"x #\n{COMMAND}",
    "substitution": f"$({COMMAND})",
    "backticks": f"`{COMMAND}`",
    "semicolon": f"x; {COMMAND}",
    "single-quote": f"x' ; {COMMAND} ; '",
    "double-quote": f'x" ; {COMMAND} ; "',
}
# A template that puts values into shell code and comments, not only into #SBATCH lines.
TEMPLATE = """#!/bin/bash
#SBATCH --job-name={{job_name}}
# job {{job_name}}, run {{run_dir}}
NAME={{job_name}}
echo {{job_name}} {{run_dir}} > name.txt
RUN_DIR={{run_dir}}
TRAIN=({{python}} {{train_args}})
srun "${TRAIN[@]}"
"""


def yaml_config(tmp_path, name: str, run_dir: str | None = None) -> str:
    path = tmp_path / name
    # JSON strings are YAML double-quoted strings: escapes such as \n keep their meaning.
    path.write_text(f"base: {CONFIG}\n" + (f"logging:\n  run_dir: {json.dumps(run_dir)}\n" if run_dir else ""))
    return str(path)


def run(t) -> str:
    return f"logging.run_dir={t / 'run'}"


# field: (what a refusal must name, `mor submit` arguments with the payload p in it; t: the test's folder)
FIELDS = {
    "--job-name": ("--job-name", lambda p, t: [CONFIG, run(t), f"--job-name={p}"]),
    "--partition": ("--partition", lambda p, t: [CONFIG, run(t), f"--partition={p}"]),
    "--account": ("--account", lambda p, t: [CONFIG, run(t), f"--account={p}"]),
    "--time": ("--time", lambda p, t: [CONFIG, run(t), f"--time={p}"]),
    "--dependency": ("--dependency", lambda p, t: [CONFIG, run(t), f"--dependency=afterany:1{p}"]),
    "--sbatch": ("--sbatch", lambda p, t: [CONFIG, run(t), f"--sbatch={p}"]),
    "--sbatch value": ("--sbatch", lambda p, t: [CONFIG, run(t), f"--sbatch=--comment={p}"]),
    "logging.run_dir": ("logging.run_dir", lambda p, t: [CONFIG, f"logging.run_dir={t / p}"]),
    "run_dir in YAML": ("logging.run_dir", lambda p, t: [yaml_config(t, "c.yaml", str(t / p))]),
    "override": ("data.dataset_dir", lambda p, t: [CONFIG, run(t), f"data.dataset_dir={p}"]),
    "config path": ("config", lambda p, t: [yaml_config(t, f"{p}.yaml"), run(t)]),
    "--template": ("--job-name", lambda p, t: [CONFIG, run(t), f"--job-name={p}", f"--template={t / 'my.sbatch'}"]),
}


def run_script(script: str, tmp_path) -> list[str]:
    """bash runs the whole script in tmp_path/cwd with srun and scontrol as stubs; srun records its
    arguments. Returns them."""
    stubs, cwd = tmp_path / "stubs", tmp_path / "cwd"
    stubs.mkdir()
    cwd.mkdir()
    (stubs / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGS"\n')
    (stubs / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    (cwd / "job.sbatch").write_text(script)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SRUN_ARGS": str(tmp_path / "srun.args")}
    r = subprocess.run(["bash", "job.sbatch"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return (tmp_path / "srun.args").read_text().split("\0")[:-1]


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
@pytest.mark.parametrize("field", list(FIELDS))
def test_payload_is_refused_or_inert(field, payload, tmp_path, capsys, monkeypatch):
    (tmp_path / "my.sbatch").write_text(TEMPLATE)
    monkeypatch.chdir(tmp_path)
    where, argv = FIELDS[field]
    rc, out, err = run_cli(capsys, ["submit", *argv(payload, tmp_path), "--dry-run"])
    if rc:
        assert rc == 2 and err.count("\n") == 1 and err.startswith("mor: ") and where in err, (rc, err)
        return
    # Accepted: then only as data (a value with a line break never is).
    assert not {"\n", "\r", "\u2028"} & set(payload), out
    assert not [line for line in out.splitlines() if line.strip().startswith(COMMAND)], out
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0
    srun_args = run_script(out, tmp_path)
    assert not list(tmp_path.rglob("PWNED")), f"{field}: {payload!r} ran as a command:\n{out}"
    # Where it reaches the training command or shell code, it arrives whole.
    if field == "--template":
        assert (tmp_path / "cwd" / "name.txt").read_text() == f"{payload} {tmp_path / 'run'}\n"
    elif field in ("logging.run_dir", "run_dir in YAML", "override", "config path"):
        assert any(payload in a for a in srun_args), (srun_args, out)


def test_current_directory_with_a_line_break_is_refused(capsys, tmp_path, monkeypatch):
    cwd = tmp_path / PAYLOADS["newline"]
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # it becomes #SBATCH --chdir
    err = cli_error(capsys, ["submit", CONFIG, f"logging.run_dir={tmp_path / 'run'}", "--dry-run"])
    assert err.startswith("mor: current directory: ")
