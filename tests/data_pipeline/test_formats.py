"""Inputs as corpora ship them: compressed JSON lines, parquet directories, Hugging Face hub-cache
symlinks and save_to_disk folders; binary files given as text are refused; --text-field everywhere."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data_pipeline.test_cli import run
from mor_dist.data_pipeline.corpus import iter_pieces, resolve_inputs
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.manifest import load_manifest


@pytest.fixture(scope="module")
def docs(text_files):
    """Real paragraphs, a few hundred of them."""
    text = "".join(f.read_text(encoding="utf-8") for f in text_files)
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return paras[:300]


def texts(path, field="body"):
    return [t for t, _ in iter_pieces(path, field)]


def jsonl_bytes(docs, field="body") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def write_zstd(path, blob: bytes, frames: int = 2) -> None:
    """zstd in several frames, as Dolma's and SlimPajama's writers leave them."""
    cut = len(blob) // frames
    with open(path, "wb") as out:
        for i in range(frames):
            part = blob[i * cut : (i + 1) * cut if i < frames - 1 else len(blob)]
            buf = pa.BufferOutputStream()
            with pa.CompressedOutputStream(buf, "zstd") as z:
                z.write(part)
            out.write(buf.getvalue().to_pybytes())


def write_arrow_stream(path, docs, field="body") -> None:
    table = pa.table({field: docs, "id": list(range(len(docs)))})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=64):
            writer.write_batch(batch)


def test_compressed_json_lines(tmp_path, docs):
    blob = jsonl_bytes(docs)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(blob))
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(blob))  # Dolma's name for JSON lines
    write_zstd(tmp_path / "a.jsonl.zst", blob)
    for name in ("a.jsonl.gz", "a.json.gz", "a.jsonl.zst"):
        assert texts(tmp_path / name) == docs, name
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(blob.split(b"\n")[0] + b"\n{oops\n"))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: not valid JSON"):
        texts(tmp_path / "bad.jsonl.gz")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: not a readable gzip file"):
        texts(tmp_path / "broken.jsonl.gz")


def test_hub_cache_symlinks_are_read_by_their_names(tmp_path, docs):
    """The Hugging Face hub cache: snapshots/<rev>/data/*.parquet are symlinks to blobs/<sha>."""
    repo = tmp_path / "datasets--org--corpus"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    data = repo / "snapshots" / "abc123" / "data"
    data.mkdir(parents=True)
    halves = [docs[:150], docs[150:]]
    for i, half in enumerate(halves):
        blob = repo / "blobs" / f"{i}e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        pq.write_table(pa.table({"body": half}), blob)
        (data / f"train-0000{i}-of-00002.parquet").symlink_to(os.path.relpath(blob, data))
    files = resolve_inputs([str(repo)])
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert all(f.is_symlink() for f in files)
    assert [t for f in files for t in texts(f)] == docs  # never 'PAR1...' as one text document
    # The same blob under a text name is refused, naming the file.
    (data / "notes.txt").symlink_to(sorted((repo / "blobs").iterdir())[0])
    with pytest.raises(DataError, match=r"notes\.txt: holds parquet data, not text; give the file a name"):
        resolve_inputs([str(data)])
    (data / "notes.txt").unlink()
    (data / "dump.jsonl").write_bytes(gzip.compress(jsonl_bytes(docs)))
    with pytest.raises(DataError, match=r"dump\.jsonl: holds gzip data, not text"):
        resolve_inputs([str(data / "dump.jsonl")])


def test_save_to_disk_folder(tmp_path, docs):
    """What datasets' save_to_disk writes: Arrow IPC stream files listed in state.json."""
    folder = tmp_path / "saved"
    folder.mkdir()
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    write_arrow_stream(folder / names[0], docs[:100])
    write_arrow_stream(folder / names[1], docs[100:])
    write_arrow_stream(folder / "cache-1234.arrow", ["not part of the dataset"])
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "x", "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"body": {"dtype": "string"}}}))
    files = resolve_inputs([str(folder)])
    assert [f.name for f in files] == names
    assert [t for f in files for t in texts(f)] == docs
    with pytest.raises(DataError, match=r"data-00000-of-00002\.arrow: no column 'text'.*--text-field"):
        texts(files[0], "text")
    # The Arrow file format (random access) reads the same.
    table = pa.table({"body": docs})
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    assert texts(tmp_path / "f.arrow") == docs


def test_text_field_works_for_every_format(tmp_path, docs, tokenizer_file, capsys):
    """One corpus in six formats, prepared with --text-field: six identical datasets."""
    src = tmp_path / "src"
    src.mkdir()
    blob = jsonl_bytes(docs)
    (src / "c.jsonl").write_bytes(blob)
    (src / "c.jsonl.gz").write_bytes(gzip.compress(blob))
    write_zstd(src / "c.jsonl.zst", blob)
    (src / "pq").mkdir()  # a parquet directory
    pq.write_table(pa.table({"body": docs[:120]}), src / "pq" / "part-0.parquet")
    pq.write_table(pa.table({"body": docs[120:]}), src / "pq" / "part-1.parquet")
    (src / "disk").mkdir()
    write_arrow_stream(src / "disk" / "data-00000-of-00001.arrow", docs)
    (src / "disk" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    pq.write_table(pa.table({"body": docs}), src / "c.parquet", row_group_size=50)
    splits = {}
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "pq", "disk", "c.parquet"):
        out = tmp_path / f"out-{name}"
        code = run(["data", "prepare", str(src / name), "-o", str(out), "--seq-len", "16", "--tokenizer",
                    str(tokenizer_file), "--text-field", "body", "--shard-samples", "64", "--workers", "1",
                    "--no-progress"])
        assert code == 0, capsys.readouterr().err
        m = load_manifest(out)
        assert m.data["corpus"]["documents"] == len(docs)
        splits[name] = m.data["splits"]
    assert all(s == splits["c.jsonl"] for s in splits.values())
