"""README and docs stand alone: their links and repository paths resolve inside the repository,
nothing points outside it, and the `mor` commands they show parse as written (the cheap ones run)."""

from __future__ import annotations

import re
import shlex

import pytest

from mor_dist.cli import build_parser, main
from tests.conftest import REPO
from tests.training.conftest import tiny_dataset, tiny_overrides  # noqa: F401  (the session fixture)

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "bench").glob("*.md"))]
TOP = ("mor_dist/", "docs/", "tests/", "bench/", "configs/", "slurm/", "launcher/", "kernels/", "data_pipeline/",
       ".ci/")
PLACEHOLDER = re.compile(r"\.\.\.|\[|\b[A-Z][A-Z_]{2,}\b")  # CONFIG, RUN_DIR, [--flag], ...
CHEAP = ("info", "config", "plan")  # run for real; train and submit run with --dry-run


def _code_lines(text: str) -> list[str]:
    """Lines of fenced and indented code blocks, backslash continuations joined."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            lines.append(line.strip())
    return re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `mor`) for each `mor` command in a code block, placeholders left out."""
    found = []
    for doc in DOCS:
        for line in _code_lines(doc.read_text()):
            for part in line.removeprefix("$ ").split("&&"):
                if not re.match(r"\s*(mor |torchrun .*-m mor_dist\.cli )", part):
                    continue
                words = shlex.split(part, comments=True)
                if words[:1] == ["mor"]:
                    argv = words[1:]
                elif "mor_dist.cli" in words:  # torchrun ... -m mor_dist.cli ARGS
                    argv = words[words.index("mor_dist.cli") + 1:]
                else:
                    continue
                if not PLACEHOLDER.search(" ".join(argv)):
                    found.append((f"{doc.name}: {part.strip()}", argv))
    return found


def test_links_and_paths_resolve_inside_the_repository():
    problems = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists() or not path.is_relative_to(REPO):
                problems.append(f"{doc.name}: link {target}")
        for code in re.findall(r"`([^`\s]+)`", text):
            path = code.split(":")[0].rstrip(".,;")
            if path.startswith(TOP) and not re.search(r"[<>{}*$]|\b[A-Z]{2,}", path) and not (REPO / path).exists():
                problems.append(f"{doc.name}: path {code}")
        for outside in re.findall(r"\.\./shared\S*|/work/\S*", text):
            problems.append(f"{doc.name}: points outside the repository: {outside}")
    assert not problems, "\n".join(problems)


def test_the_commands_shown_parse():
    shown = commands()
    assert len(shown) > 25  # the extraction finds them
    failed = []
    for where, argv in shown:
        command = next((a for a in argv if not a.startswith("-")), None)
        try:
            build_parser(command).parse_args(argv)
        except SystemExit as e:
            if e.code:  # --help and --version exit 0
                failed.append(where)
    assert not failed, "\n".join(failed)


def test_the_cheap_commands_run(tiny_dataset, tmp_path, monkeypatch, capsys):
    """info / config / plan as written; train and submit with --dry-run (train on the tests' small
    dataset, whose vocabulary and sequence length the overrides set)."""
    monkeypatch.chdir(REPO)
    ran = 0
    for where, argv in commands():
        if argv[:1] == ["train"]:
            run_dir = tmp_path / f"run{ran}"
            argv = [*argv, *tiny_overrides(tiny_dataset, run_dir), "--dry-run"]
        elif argv[:1] == ["submit"] and "--dry-run" in argv:
            pass
        elif argv[:1] and argv[0] not in CHEAP:
            continue
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, (where, err)
        ran += 1
    assert ran >= 8
    assert not (REPO / "runs" / "mor360m-nr3").exists()  # a dry run writes nothing


@pytest.mark.parametrize("doc", ["README.md", "docs/mor.md"], ids=str)
def test_mor_is_explained_in_our_own_words(doc):
    text = (REPO / doc).read_text()
    assert "MOR.md" not in text and "shared/docs" not in text
