from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mor_dist.data_pipeline.corpus import default_corpus_files, iter_pieces, resolve_inputs
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.tokenizer import load_tokenizer


def test_resolve_files_dirs_globs(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/x.txt", "a/b/y.jsonl", "a/b/z.md", "a/skip.bin", "w.parquet"]:
        (tmp_path / name).write_text("t")
    got = resolve_inputs([str(tmp_path / "a"), str(tmp_path / "*.parquet"), str(tmp_path / "a" / "x.txt")])
    assert got == sorted(p.resolve() for p in [tmp_path / "a/x.txt", tmp_path / "a/b/y.jsonl",
                                                tmp_path / "a/b/z.md", tmp_path / "w.parquet"])
    assert resolve_inputs([str(tmp_path / "**" / "*.md")]) == [(tmp_path / "a/b/z.md").resolve()]


@pytest.mark.parametrize("item, problem", [("nope.txt", "does not exist"), ("*.nothing", "matches no files"),
                                          ("a/skip.bin", "unsupported input type")])
def test_resolve_errors_name_the_input(tmp_path, item, problem):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "skip.bin").write_text("t")
    with pytest.raises(DataError, match=problem) as e:
        resolve_inputs([str(tmp_path / item)])
    assert item.split("/")[-1] in str(e.value)


def test_default_corpus_is_stdlib_without_tests():
    files = default_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files == sorted(files) and len(files) > 100
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any({"test", "tests", "site-packages", "__pycache__"} & set(f.relative_to(root).parts) for f in files)
    assert root / "json" / "decoder.py" in files


def test_jsonl_and_parquet_documents(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "first doc", "id": 1}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert list(iter_pieces(j)) == [("first doc", True), ("second", True)]
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["one", None, "two"]}), p)
    assert list(iter_pieces(p, "body")) == [("one", True), ("two", True)]
    with pytest.raises(DataError, match=r"d\.parquet.*no column 'text'"):
        list(iter_pieces(p))
    j.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "bad"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: no string field 'text' \(its fields: txt\); name the"):
        list(iter_pieces(j))
    j.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'text' is of type int, not a string; give every line"):
        list(iter_pieces(j))


def test_text_pieces_tokenize_like_the_whole_file(tmp_path, text_files, tokenizer_file):
    """Big text files are read in pieces; the cuts must not change a single token id."""
    tok = load_tokenizer(tokenizer_file)
    whole = "".join(f.read_text(encoding="utf-8") for f in text_files)
    f = tmp_path / "big.txt"
    f.write_text(whole, encoding="utf-8")
    pieces = list(iter_pieces(f, piece_chars=3000))
    assert len(pieces) > 10 and [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(t for t, _ in pieces) == whole
    ids = [i for t, _ in pieces for i in tok.encode(t).ids]
    assert ids == tok.encode(whole).ids
