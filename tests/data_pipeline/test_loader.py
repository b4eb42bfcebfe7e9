from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from tests.data_pipeline.conftest import SEQ_LEN, cat, take
from mor_dist.data_pipeline.config import DataConfig
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.loader import StreamingLoader, TokenDataset, build_loader, data_parallel_rank
from mor_dist.data_pipeline.shards import BLOCK


def test_batches_are_samples_of_the_split(dataset):
    ds = TokenDataset(dataset.dir, seq_len=SEQ_LEN)
    (b,), _ = take(ds, 1, shuffle=False)
    assert b["tokens"].dtype == torch.int64 and b["tokens"].shape == (8, SEQ_LEN + 1)
    assert b["keys"].tolist() == list(range(8)) and b["positions"].tolist() == list(range(8))
    # Stride seq_len: the last token of sample k is the first of sample k + 1 (unless k + 1 is val).
    assert b["tokens"][0, -1] == b["tokens"][1, 0]


def test_exact_resume_across_an_epoch_boundary_with_workers(dataset):
    ds = TokenDataset(dataset.dir)
    n_epoch = ds.num_samples // 16
    ref, ref_state = take(ds, n_epoch + 30, batch=16, workers=2)
    assert ref_state["epoch"] == 1
    a, s1 = take(ds, n_epoch - 10, batch=16, workers=2)  # interrupted before the boundary,
    b, s2 = take(ds, 25, batch=16, workers=2, state=s1)  # again just after it,
    c, s3 = take(ds, 15, batch=16, workers=0, state=s2)  # resumed with another worker count
    assert torch.equal(cat(a + b + c), cat(ref))
    assert s3 == ref_state and s1["position"] == (n_epoch - 10) * 16


def test_resume_at_another_data_parallel_size(dataset):
    ds = TokenDataset(dataset.dir)
    # The global stream seen by one rank is the reference order of positions.
    ref_keys = cat(take(ds, None, batch=64, epochs=2)[0], "keys").tolist()
    steps4, steps2, batch = 40, 50, 8
    phase1 = [take(ds, steps4, batch=batch, rank=r, world=4, workers=2 * (r % 2)) for r in range(4)]
    states = [s for _, s in phase1]
    assert all(s == states[0] for s in states) and states[0]["position"] == 4 * steps4 * batch
    phase2 = [take(ds, steps2, batch=batch, rank=r, world=2, state=states[0]) for r in range(2)]
    assert phase2[0][1]["position"] == 4 * steps4 * batch + 2 * steps2 * batch > ds.num_samples
    pos = torch.cat([cat(out, "positions") for out, _ in phase1 + phase2]).tolist()
    keys = torch.cat([cat(out, "keys") for out, _ in phase1 + phase2]).tolist()
    assert sorted(pos) == list(range(phase2[0][1]["position"]))  # no position skipped or repeated
    assert keys == [ref_keys[p] for p in pos]


def test_one_epoch_over_ranks_and_workers_has_no_duplicates(dataset):
    ds = TokenDataset(dataset.dir)
    world = 3
    per_rank = [cat(take(ds, None, batch=7, rank=r, world=world, workers=2, epochs=1)[0], "keys").tolist()
                for r in range(world)]
    assert len({len(k) for k in per_rank}) == 1  # equal counts keep ranks in step
    keys = sum(per_rank, [])
    assert len(keys) == len(set(keys)) == ds.num_samples - ds.num_samples % world
    assert set(keys) <= set(range(ds.num_samples))


def test_order_comes_from_the_seed(dataset):
    ds = TokenDataset(dataset.dir)
    n = ds.num_samples
    e01 = cat(take(ds, None, batch=n, seed=7, epochs=2)[0], "keys").tolist()
    assert cat(take(ds, None, batch=n, seed=7, epochs=2)[0], "keys").tolist() == e01
    other = cat(take(ds, None, batch=n, seed=8, epochs=1)[0], "keys").tolist()
    e0, e1 = e01[:n], e01[n:]
    assert sorted(e0) == sorted(e1) == sorted(other) == list(range(n))
    assert e0 != e1 and e0 != other and e0 != list(range(n))
    # Shards are shuffled as units: an epoch visits each shard once, in one run.
    first_keys = [s["first_key"] for s in dataset.shards("train")]
    shard_of = np.searchsorted(first_keys, e0, side="right") - 1
    assert (np.diff(shard_of) != 0).sum() == len(first_keys) - 1
    # ... and the samples inside a shard are reshuffled every epoch.
    def within(keys):  # the order of the first three shards' samples
        return [[k for k in keys if lo <= k < hi] for lo, hi in zip(first_keys[:3], first_keys[1:4])]
    assert all(a != b and a != sorted(a) for a, b in zip(within(e0), within(e1)))


def test_build_loader_from_config_val_is_one_ordered_pass(dataset):
    cfg = DataConfig(dataset_dir=str(dataset.dir), seq_len=SEQ_LEN, num_workers=0)
    val = build_loader(cfg, 4, "val", rank=0, world_size=1)
    keys = cat(list(val), "keys").tolist()
    assert keys == list(range(dataset.data["splits"]["val"]["samples"]))
    train = build_loader(cfg, 4, rank=0, world_size=1)
    assert next(iter(train))["keys"].tolist() != [0, 1, 2, 3]  # shuffled


def test_rank_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert data_parallel_rank() == (2, 4)
    assert data_parallel_rank(0, 1) == (0, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank 4 of world size 4"):
        data_parallel_rank()


def test_rank_from_the_process_group_wins_over_environment(monkeypatch, tmp_path):
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert data_parallel_rank() == (0, 1)
    finally:
        dist.destroy_process_group()


def test_state_of_another_stream_is_refused(dataset):
    ds = TokenDataset(dataset.dir)
    _, state = take(ds, 2)
    with pytest.raises(DataError, match="seed=7.*seed=8"):
        take(ds, 1, seed=8, state=state)
    with pytest.raises(DataError, match="another dataset or split"):
        take(TokenDataset(dataset.dir, "val"), 1, state=state)


# ---- damaged datasets ----


def _shard(d, i=3):
    return d / f"train-{i:06d}.tar"


def _sample_offset(ds, sample_i):
    """Byte offset of a sample's tar header in its shard (all members have one size)."""
    return sample_i * ds.layout.stride


def _poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_missing_truncated_and_hash_mismatch_shards(dataset_copy):
    d = dataset_copy
    ds = TokenDataset(d)
    data_at = _sample_offset(ds, 5) + BLOCK + 200  # inside sample 5's token ids
    original = _shard(d).read_bytes()
    _poke(_shard(d), data_at, b"\x01\x00")
    TokenDataset(d)  # the size check passes ...
    with pytest.raises(DataError, match=r"train-000003\.tar: shard sha256 .* does not match"):
        TokenDataset(d, verify="sha256")
    os.truncate(_shard(d), len(original) // 2)
    with pytest.raises(DataError, match=r"train-000003\.tar: shard is truncated: \d+ bytes"):
        TokenDataset(d)
    _shard(d).unlink()
    with pytest.raises(DataError, match=r"train-000003\.tar: shard is missing"):
        TokenDataset(d)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_sample_is_named_when_read(dataset_copy, workers):
    ds = TokenDataset(dataset_copy)
    first = ds.shards[3]["first_key"]
    _poke(_shard(dataset_copy), _sample_offset(ds, 5) + 3, b"X")  # tar member name of sample 5
    want = rf"train-000003\.tar: corrupt tar header at sample 5 \(key {first + 5:010d}\)"
    with pytest.raises(DataError, match=want) as e:
        take(ds, None, batch=16, workers=workers, epochs=1, shuffle=False)
    # From a worker too: the original error, file first, not torch's "Caught DataError ... Traceback".
    assert str(e.value).startswith(str(_shard(dataset_copy))) and "Traceback" not in str(e.value)
    assert e.value.path == str(_shard(dataset_copy))


def test_out_of_vocabulary_ids_are_corruption(dataset_copy):
    ds = TokenDataset(dataset_copy)
    _poke(_shard(dataset_copy), _sample_offset(ds, 0) + BLOCK + 128, b"\xff\xff")
    with pytest.raises(DataError, match=r"train-000003\.tar: corrupt sample 0 .*token id 65535 >= vocab size"):
        take(ds, None, batch=16, epochs=1, shuffle=False)


def test_tokenizer_seq_len_and_manifest_mismatches(dataset_copy, tmp_path, text_files):
    from mor_dist.data_pipeline.corpus import iter_texts
    from mor_dist.data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    other = tmp_path / "other.json"
    save_tokenizer(train_tokenizer(iter_texts(text_files[:1]), 300), other)
    with pytest.raises(DataError, match=r"other\.json: tokenizer mismatch"):
        TokenDataset(dataset_copy, tokenizer=other)
    with pytest.raises(DataError, match=r"manifest\.json: seq_len mismatch: the config asks for 64"):
        TokenDataset(dataset_copy, seq_len=64)
    (dataset_copy / "tokenizer.json").write_bytes(other.read_bytes())
    with pytest.raises(DataError, match=r"copy/tokenizer\.json: tokenizer mismatch"):
        TokenDataset(dataset_copy)
    (dataset_copy / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json: dataset manifest is missing"):
        TokenDataset(dataset_copy)


def test_skip_mode_counts_and_logs(dataset_copy, caplog):
    ds0 = TokenDataset(dataset_copy)
    lost = set(range(ds0.shards[3]["first_key"], ds0.shards[4]["first_key"]))
    bad_key = ds0.shards[6]["first_key"] + 2
    _shard(dataset_copy, 3).unlink()
    _poke(_shard(dataset_copy, 6), _sample_offset(ds0, 2) + 3, b"X")
    with caplog.at_level(logging.WARNING, logger="mor_dist.data"):
        ds = TokenDataset(dataset_copy, skip_corrupt=True)
        loader = StreamingLoader(ds, 16, seed=1, rank=0, world_size=1, epochs=1)
        keys = cat(list(loader), "keys").tolist()
    assert ds.skipped_shards == ["train-000003.tar"] and loader.skipped_samples == 1
    assert sorted(keys) == sorted(set(range(ds0.num_samples)) - lost - {bad_key})
    logged = caplog.text
    assert "skipping shard" in logged and "train-000003.tar: shard is missing" in logged
    assert f"train-000006.tar: corrupt tar header at sample 2 (key {bad_key:010d})" in logged
