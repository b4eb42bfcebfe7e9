"""Shards from URLs: a real HTTP server on 127.0.0.1 (curl through webdataset's gopen) and pipe:
commands, read in stream order -- identical to reading the same files locally, exactly resumable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.data_pipeline.conftest import cat, take as take_batches
from tests.data_pipeline.serve import serve
from tests.data_pipeline.test_cli import REPO_CONFIG as TINY, run
from mor_dist.data_pipeline.config import DataConfig
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.loader import StreamingLoader, TokenDataset, build_loader
from mor_dist.data_pipeline.remote import FetchPolicy

FAST = FetchPolicy(retries=2, backoff_s=0.01)


def take(ds, n, *, read="stream", **kwargs):
    """conftest.take, reading shards in stream order unless told (as a remote source must)."""
    return take_batches(ds, n, seed=11, read=read, **kwargs)


@pytest.fixture(scope="module")
def http(dataset):
    with serve(dataset.dir.parent) as (base, failures, requests):
        yield f"{base}/{dataset.dir.name}", failures, requests


def test_http_and_pipe_read_like_local_files(dataset, http):
    url, _, requests = http
    local, web = TokenDataset(dataset.dir), TokenDataset(url, fetch=FAST)
    pipe = TokenDataset(f"pipe:cat {dataset.dir}/{{}}", fetch=FAST)
    assert local.seekable and not web.seekable and not pipe.seekable
    assert web.fingerprint == pipe.fingerprint == local.fingerprint
    requests.clear()
    for r in range(2):  # 2 ranks x 2 workers: four readers, each owning its shards
        want, _ = take(local, 40, rank=r, world=2, workers=2)
        got, _ = take(web, 40, rank=r, world=2, workers=2)
        for field in ("tokens", "keys", "positions"):
            assert torch.equal(cat(got, field), cat(want, field))
    shards = [p for p in requests if p.endswith(".tar")]
    assert len(shards) == len(set(shards)) >= 2 * 40 * 8 // 100  # each shard fetched by one reader, once
    want, _ = take(local, 30)
    got, _ = take(pipe, 30)
    assert torch.equal(cat(got), cat(want))
    # One reader streams exactly the seek order.
    seek, _ = take(local, 30, read="seek")
    assert torch.equal(cat(seek), cat(want))


def test_remote_resume_is_exact_and_a_new_layout_reads_every_sample_once(dataset, http):
    web = TokenDataset(http[0], fetch=FAST)
    ref = [take(web, 90, rank=r, world=2, workers=2)[0] for r in range(2)]
    first = [take(web, 30, rank=r, world=2, workers=2) for r in range(2)]
    state = first[0][1]
    assert state == first[1][1] and state["order"] == "stream" and state["position"] == 30 * 8 * 2
    json.dumps(state)  # goes into meta.json as is
    for r in range(2):  # a restart at the same layout: the same batches as without one
        resumed, _ = take(web, 60, rank=r, world=2, workers=2, state=state)
        assert torch.equal(cat(first[r][0] + resumed), cat(ref[r]))
    # Three ranks without workers from the same state: nothing read twice, nothing left behind.
    after = [take(web, 70, rank=r, world=3, state=state) for r in range(3)]
    assert after[0][1]["lanes"]["layout"] == [3, 1, 8] and after[0][1]["lanes"]["gen"] == 1
    seen = cat([b for out, _ in first for b in out] + [b for out, _ in after for b in out], "positions").tolist()
    assert len(seen) == len(set(seen)) == 30 * 8 * 2 + 70 * 8 * 3
    n = web.num_samples
    assert len(seen) > n  # across an epoch boundary
    # At most one unfinished shard per lane of either layout is still partly unread.
    frontier = len(seen) - (4 + 3) * max(s["samples"] for s in web.shards)
    assert set(range(frontier)) <= set(seen)


def test_a_local_seek_state_continues_from_http(dataset, http):
    local, web = TokenDataset(dataset.dir), TokenDataset(http[0], fetch=FAST)
    a, state = take(local, 25, read="seek")
    b, _ = take(web, 40, world=1, workers=2, state=state)
    pos = cat(a + b, "positions").tolist()
    assert len(pos) == len(set(pos)) and set(range(25 * 8)) <= set(pos)
    with pytest.raises(DataError, match="saved while streaming shards.*data.read=stream"):
        take(local, 1, read="seek", state=take(web, 1)[1])


def test_validation_pass_from_http_equals_local(dataset, http):
    keys = {}
    for name, where in (("local", str(dataset.dir)), ("http", http[0])):
        cfg = DataConfig(dataset_dir=where, seq_len=dataset.seq_len, num_workers=0, fetch_retries=1, fetch_backoff_s=0)
        keys[name] = [cat(list(build_loader(cfg, 4, "val", rank=r, world_size=2)), "keys").tolist() for r in range(2)]
    assert keys["http"] == keys["local"] and len(keys["http"][0]) == len(keys["http"][1]) > 0


def test_failed_fetches_are_retried_then_named(dataset, http):
    url, failures, requests = http
    web = TokenDataset(url, fetch=FAST)
    shard = web.shards[0]
    path = f"/{dataset.dir.name}/{shard['file']}"
    failures[path] = (2, 403)  # refused twice, then served
    requests.clear()
    got = web.reader(0).read(0)
    assert requests.count(path) == 3 and len(got) == dataset.seq_len + 1
    failures[path] = (10, 404)
    with pytest.raises(DataError) as e:
        take(web, 200, workers=2)
    assert str(e.value).startswith(f"{url}/{shard['file']}: shard fetch failed after 3 attempts: curl exit status 22")
    failures.clear()


def test_a_damaged_remote_shard_is_refused_by_its_sha256(tmp_path, dataset):
    copy = tmp_path / "served"
    shutil.copytree(dataset.dir, copy)
    victim = copy / dataset.shards("train")[2]["file"]
    blob = bytearray(victim.read_bytes())
    blob[5000] ^= 1
    victim.write_bytes(bytes(blob))
    with serve(tmp_path) as (base, _, _):
        web = TokenDataset(f"{base}/served", fetch=FetchPolicy(1, 0))
        with pytest.raises(DataError, match=r"served/train-000002\.tar: shard fetch failed after 2 attempts: sha256 "):
            web.reader(2)
        # mor data verify fetches every shard.
        code = run(["data", "verify", f"{base}/served", "--config", TINY, "--set", "data.fetch_retries=0"])
    assert code == 1


def test_manifest_shard_urls_unknown_schemes_and_seek_on_a_stream(dataset, dataset_copy):
    m = json.loads((dataset_copy / "manifest.json").read_text())
    for s in m["splits"]["train"]["shards"]:
        s["url"] = f"pipe:cat {dataset_copy / s['file']}"  # shards spread elsewhere; the manifest says where
    (dataset_copy / "manifest.json").write_text(json.dumps(m))
    ds = TokenDataset(dataset_copy, fetch=FAST)
    assert not ds.seekable
    want, _ = take(TokenDataset(dataset.dir), 5, read="stream")
    got, _ = take(ds, 5)
    assert torch.equal(cat(got), cat(want))
    with pytest.raises(DataError, match=r"data\.read=seek needs shards that allow random access"):
        StreamingLoader(ds, 4, read="seek", rank=0, world_size=1)
    with pytest.raises(DataError, match=r"^s3://bucket/ds: no reader for s3: URLs.*pipe:aws s3 cp s3://bucket/ds/\{\} -"):
        TokenDataset("s3://bucket/ds")
    with pytest.raises(DataError, match=r"pipe:cat x: a pipe: dataset location needs \{\}"):
        TokenDataset("pipe:cat x")


def test_verify_a_dataset_at_a_url(http, capsys):
    assert run(["data", "verify", http[0], "--read-samples"]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
