from __future__ import annotations

import hashlib
import json
import math
import warnings

import numpy as np
import pytest

from tests.data_pipeline.conftest import SEQ_LEN, SHARD_SAMPLES, VAL_FRACTION, prepare_small
from mor_dist.data_pipeline import prepare as prep
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.shards import ShardWriter
from mor_dist.data_pipeline.tokenizer import load_tokenizer


def _expected_splits(files, tokenizer_file):
    """The packing spec, computed independently: documents + EOS in sorted file order, samples of
    seq_len + 1 every seq_len tokens, every k-th held out per val_fraction."""
    tok = load_tokenizer(tokenizer_file)
    eos = tok.token_to_id("<|endoftext|>")
    stream = []
    for f in sorted(files):
        stream += tok.encode(f.read_text(encoding="utf-8")).ids + [eos]
    n = (len(stream) - 1) // SEQ_LEN
    wins = [stream[k * SEQ_LEN : k * SEQ_LEN + SEQ_LEN + 1] for k in range(n)]
    every = round(1 / VAL_FRACTION)
    val = [w for k, w in enumerate(wins) if (k + 1) % every == 0]
    train = [w for k, w in enumerate(wins) if (k + 1) % every != 0]
    return train, val


def _read_with_webdataset(m, split):
    import webdataset as wds

    urls = [str(m.dir / s["file"]) for s in m.shards(split)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webdataset's notes about shardshuffle and workers
        return list(wds.WebDataset(urls, shardshuffle=False).decode())


def test_shards_hold_the_packed_stream_and_plain_webdataset_reads_them(dataset, text_files, tokenizer_file):
    assert math.isclose(1 / VAL_FRACTION, round(1 / VAL_FRACTION))
    want = dict(zip(("train", "val"), _expected_splits(text_files, tokenizer_file)))
    assert len(want["val"]) > 0 and len(want["train"]) > 3 * SHARD_SAMPLES
    for split in ("train", "val"):
        samples = _read_with_webdataset(dataset, split)
        assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(len(want[split]))]
        got = [s["tokens.npy"] for s in samples]
        assert all(a.dtype == np.uint16 and a.shape == (SEQ_LEN + 1,) for a in got)
        assert [a.tolist() for a in got] == want[split]
        info = dataset.data["splits"][split]
        assert info["samples"] == len(want[split]) == sum(s["samples"] for s in info["shards"])
        for s in info["shards"]:
            blob = (dataset.dir / s["file"]).read_bytes()
            assert len(blob) == s["bytes"] and hashlib.sha256(blob).hexdigest() == s["sha256"]
        assert all(s["samples"] == SHARD_SAMPLES for s in info["shards"][:-1])
    tok = dataset.data["tokenizer"]
    assert tok["eos_id"] == 0 and tok["vocab_size"] <= 512
    assert not list(dataset.dir.glob("*.tmp*")) and not (dataset.dir / prep.WORK).exists()


def test_packing_does_not_depend_on_worker_count(tmp_path, dataset, text_files, tokenizer_file):
    m2 = prepare_small(tmp_path / "w2", text_files, tokenizer_file, workers=2)
    assert m2.data["splits"] == dataset.data["splits"]


def test_literal_eos_text_is_not_a_document_break(tmp_path, tokenizer_file):
    f = tmp_path / "d.jsonl"
    docs = ["a doc that mentions <|endoftext|> inside " * 3, "second document " * 5, "", "third " * 9]
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    m = prep.prepare_dataset(tmp_path / "out", [str(f)], seq_len=8, tokenizer=tokenizer_file, val_fraction=0.0,
                             shard_samples=1000, workers=1, progress=False)
    tok = load_tokenizer(tokenizer_file)
    tok.encode_special_tokens = True
    stream = [i for d in docs if d for i in tok.encode(d).ids + [0]]
    assert stream.count(0) == 3  # one EOS per non-empty document, none from the literal text
    samples = [s["tokens.npy"].tolist() for s in _read_with_webdataset(m, "train")]
    assert samples == [stream[k * 8 : k * 8 + 9] for k in range((len(stream) - 1) // 8)]
    assert m.data["corpus"]["documents"] == 3 and m.data["splits"]["val"]["samples"] == 0


class _Interrupt(Exception):
    pass


def test_restart_keeps_finished_shards_and_redoes_nothing(tmp_path, monkeypatch, dataset, text_files, tokenizer_file):
    out = tmp_path / "restart"
    real_close = ShardWriter.close
    closed = []

    def close_then_die(self):
        if len(closed) == 3:
            self._f.write(b"half a shard")  # a temp file is left half written, as by a kill
            self._f.flush()
            raise _Interrupt
        closed.append(self.path.name)
        return real_close(self)

    monkeypatch.setattr(ShardWriter, "close", close_then_die)
    monkeypatch.setattr(ShardWriter, "abort", lambda self: None)  # a killed run cleans nothing up
    with pytest.raises(_Interrupt):
        prepare_small(out, text_files, tokenizer_file)
    assert not (out / "manifest.json").exists() and list(out.glob("*.tar.tmp.*"))
    stamps = {n: (out / n).stat().st_mtime_ns for n in closed}

    monkeypatch.setattr(ShardWriter, "close", real_close)
    tokenized = []
    real_tok = prep._tokenize_file
    monkeypatch.setattr(prep, "_tokenize_file", lambda task: tokenized.append(task) or real_tok(task))
    m = prepare_small(out, text_files, tokenizer_file)
    assert tokenized == []  # every file's ids were cached by the first run
    assert {n: (out / n).stat().st_mtime_ns for n in closed} == stamps  # finished shards not rewritten
    assert not list(out.glob("*.tmp*")) and not (out / prep.WORK).exists()
    assert m.data["splits"] == dataset.data["splits"]  # same bytes as an uninterrupted run

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare_small(out, text_files, tokenizer_file).data == m.data  # finished: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_other_settings_need_overwrite(tmp_path, text_files, tokenizer_file):
    out = tmp_path / "o"
    prepare_small(out, text_files[:1], tokenizer_file)
    with pytest.raises(DataError, match=r"other settings.*seq_len: 32 -> 16.*--overwrite"):
        prepare_small(out, text_files[:1], tokenizer_file, seq_len=16)
    m = prepare_small(out, text_files[:1], tokenizer_file, seq_len=16, overwrite=True)
    assert m.seq_len == 16 and all((out / s["file"]).is_file() for s in m.shards("train"))
    # Rebuilding with the dataset's own tokenizer copy must not delete it first.
    m = prepare_small(out, text_files[:1], out / "tokenizer.json", seq_len=8, overwrite=True)
    assert m.seq_len == 8 and not list(out.glob("*.tmp*"))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json"] + [s["file"] for sp in ("train", "val") for s in m.shards(sp)])


def test_trains_a_tokenizer_when_none_is_given(tmp_path, text_files):
    m = prep.prepare_dataset(tmp_path / "t", [str(f) for f in text_files[:1]], seq_len=64, vocab_size=300,
                             shard_samples=50, workers=1, progress=False)
    tok = load_tokenizer(m.dir / "tokenizer.json")
    assert tok.get_vocab_size() == m.data["tokenizer"]["vocab_size"] <= 300
    assert m.data["prepare"]["tokenizer_source"] == "trained" and m.data["splits"]["train"]["samples"] > 0


def test_too_little_text_is_an_error(tmp_path, tokenizer_file):
    f = tmp_path / "tiny.txt"
    f.write_text("hi")
    with pytest.raises(DataError, match="not enough for one sample"):
        prep.prepare_dataset(tmp_path / "x", [str(f)], seq_len=64, tokenizer=tokenizer_file, workers=1, progress=False)


@pytest.fixture(scope="module")
def large_files(tmp_path_factory, text_files):
    """One .jsonl and one parquet file of real text, large enough to be split into parts."""
    from mor_dist.data_pipeline.corpus import plan_parts

    root = tmp_path_factory.mktemp("large")
    text = "".join(f.read_text(encoding="utf-8") for f in text_files)
    paras = [p for p in text.split("\n\n") if p.strip()]
    docs = paras * (1 + 700_000 // len(text))
    jsonl, parquet = root / "big.jsonl", root / "big.parquet"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), parquet, row_group_size=max(1, len(docs) // 40))
    assert len(plan_parts(jsonl)) > 2 and len(plan_parts(parquet)) > 2
    return jsonl, parquet


def test_parts_hold_the_documents_of_the_whole_file(large_files):
    from mor_dist.data_pipeline.corpus import iter_pieces, plan_parts

    for f in large_files:
        whole = list(iter_pieces(f))
        parts = plan_parts(f)
        assert sum(n for _, n in parts) == f.stat().st_size
        assert [d for part, _ in parts for d in iter_pieces(f, part=part)] == whole
    jsonl = large_files[0]
    whole = list(iter_pieces(jsonl))
    line_start = len(jsonl.read_bytes().split(b"\n", 1)[0]) + 1  # where line 2 starts
    size = jsonl.stat().st_size
    for cut in (line_start - 1, line_start, line_start + 1):  # a range may start exactly at a line
        pieces = [list(iter_pieces(jsonl, part=("bytes", lo, hi))) for lo, hi in ((0, cut), (cut, size))]
        assert pieces[0] + pieces[1] == whole and len(pieces[0]) == 1 + (cut > line_start)


def test_one_large_file_splits_over_workers_into_identical_output(tmp_path, large_files, tokenizer_file):
    for f in large_files:
        one = prepare_small(tmp_path / f"{f.suffix}-1", [f], tokenizer_file, workers=1)
        two = prepare_small(tmp_path / f"{f.suffix}-2", [f], tokenizer_file, workers=2)
        assert one.data == two.data and one.data["splits"]["train"]["samples"] > 3 * SHARD_SAMPLES
        for s in one.shards("train") + one.shards("val"):
            assert (one.dir / s["file"]).read_bytes() == (two.dir / s["file"]).read_bytes()
