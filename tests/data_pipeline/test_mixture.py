"""Weighted mixtures of prepared datasets: shares, determinism, exact resume (seek and stream order),
finite passes, and per-source token counts in TensorBoard from a real `mor train`."""

from __future__ import annotations

import shutil
from collections import Counter
from itertools import islice

import pytest
import torch

from tests.data_pipeline.conftest import prepare_small
from tests.data_pipeline.serve import serve
from mor_dist.data_pipeline.config import DataConfig, SourceConfig
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.loader import StreamingLoader, TokenDataset, build_loader
from mor_dist.data_pipeline.order import Mixture

WEIGHTS = [5.0, 3.0, 2.0]


@pytest.fixture(scope="session")
def sources(tmp_path_factory, dataset, text_files, tokenizer_file):
    """Three prepared datasets with one tokenizer: the shared small one and two made of its parts."""
    root = tmp_path_factory.mktemp("mix")
    return [dataset, prepare_small(root / "first", text_files[:1], tokenizer_file),
            prepare_small(root / "rest", text_files[1:], tokenizer_file)]


def datasets(sources, split="train"):
    return [TokenDataset(m.dir, split) for m in sources]


def take(dss, n, *, batch=25, rank=0, world=1, workers=0, seed=5, state=None, read="seek", weights=WEIGHTS):
    loader = StreamingLoader(dss, batch, weights=weights, seed=seed, rank=rank, world_size=world,
                             num_workers=workers, prefetch_factor=2, read=read)
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    out = list(islice(it, n))
    it.close()
    return out, loader


def pairs(batches):
    return list(zip(torch.cat([b["source"] for b in batches]).tolist(),
                    torch.cat([b["positions"] for b in batches]).tolist()))


def test_mixture_schedule_counts_match_its_draws():
    mix = Mixture([0.7, 0.2, 0.1], seed=3)
    draws = [mix.locate(t) for t in range(3000)]
    for t in (0, 1, 63, 64, 65, 1000, 2999):
        assert mix.counts(t) == [sum(1 for j, _ in draws[:t] if j == s) for s in range(3)]
    for s in range(3):  # each source's positions are 0, 1, 2, ... in mixture order
        assert [p for j, p in draws if j == s] == list(range(sum(1 for j, _ in draws if j == s)))
    assert Mixture([1.0], seed=3).locate(12345) == (0, 12345)
    # A finite pass ends where the first source runs out.
    end = mix.end([1000, 1000, 1000])
    assert mix.counts(end)[0] == 1000 and mix.counts(end + 1)[0] == 1001


@pytest.mark.parametrize("read, world, workers", [("seek", 1, 0), ("stream", 2, 2)])
def test_weights_hold_within_one_percent_over_10k_samples(sources, read, world, workers):
    dss = datasets(sources)
    batches = [b for r in range(world) for b in take(dss, 10_000 // 25 // world, rank=r, world=world,
                                                     workers=workers, read=read)[0]]
    got = Counter(torch.cat([b["source"] for b in batches]).tolist())
    assert sum(got.values()) == 10_000
    for j, w in enumerate(WEIGHTS):
        want = 10_000 * w / sum(WEIGHTS)
        assert abs(got[j] - want) <= 0.01 * want, (j, got[j], want)
    _, loader = take(dss, 10_000 // 25 // world, world=world, workers=workers, read=read)
    assert loader.source_samples() == [got[j] for j in range(3)]  # what TensorBoard is told
    assert len(set(pairs(batches))) == 10_000  # no sample of any source twice


def test_mixture_order_comes_from_the_seed(sources):
    dss = datasets(sources)
    a = pairs(take(dss, 20)[0])
    assert pairs(take(dss, 20)[0]) == a
    assert pairs(take(dss, 20, seed=6)[0]) != a
    assert pairs(take(dss, 20, weights=[1.0, 1.0, 1.0])[0]) != a


def test_mixture_resume_at_another_data_parallel_size_reads_the_same_samples(sources):
    dss = datasets(sources)
    batch = 10
    phase1 = [take(dss, 30, batch=batch, rank=r, world=4, workers=2 * (r % 2)) for r in range(4)]
    state = phase1[0][1].state_dict()
    assert all(out[1].state_dict() == state for out in phase1)
    phase2 = [take(dss, 40, batch=batch, rank=r, world=2, state=state) for r in range(2)]
    got = [p for out, _ in phase1 + phase2 for p in pairs(out)]
    total = 4 * 30 * batch + 2 * 40 * batch
    assert len(got) == len(set(got)) == total
    assert set(got) == set(pairs(take(dss, total // 25)[0]))  # exactly the first `total` of the global order


def test_streamed_mixture_resume_is_exact(sources):
    dss = datasets(sources)
    ref = [take(dss, 40, rank=r, world=2, workers=2, read="stream")[0] for r in range(2)]
    first = [take(dss, 15, rank=r, world=2, workers=2, read="stream") for r in range(2)]
    state = first[0][1].state_dict()
    for r in range(2):
        rest, loader = take(dss, 25, rank=r, world=2, workers=2, read="stream", state=state)
        assert torch.equal(torch.cat([b["tokens"] for b in first[r][0] + rest]),
                           torch.cat([b["tokens"] for b in ref[r]]))
        assert torch.equal(torch.cat([b["source"] for b in first[r][0] + rest]),
                           torch.cat([b["source"] for b in ref[r]]))
    # Another layout: every source's samples still read once.
    after = [take(dss, 25, rank=r, world=1, workers=0, read="stream", state=state) for r in range(1)]
    got = [p for out, _ in first + after for p in pairs(out)]
    assert len(got) == len(set(got)) == (2 * 15 + 25) * 25


def test_validation_mixture_is_one_even_pass_until_a_source_runs_out(sources):
    sources_cfg = [SourceConfig(dir=str(m.dir), weight=w, name=n) for m, w, n in zip(sources, WEIGHTS, "xyz")]
    cfg = DataConfig(sources=sources_cfg, seq_len=sources[0].seq_len, num_workers=0)
    one = pairs(list(build_loader(cfg, 3, "val", rank=0, world_size=1)))
    val = [m.data["splits"]["val"]["samples"] for m in sources]
    used = Counter(j for j, _ in one)
    assert len(one) == len(set(one)) and all(p < val[j] for j, p in one)
    assert any(used[j] == val[j] for j in range(3))  # it ran until one source was used up
    per_rank = [pairs(list(build_loader(cfg, 3, "val", rank=r, world_size=2))) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(one) // 2  # ranks stay in step
    assert set(per_rank[0] + per_rank[1]) <= set(one)
    train = build_loader(cfg, 3, rank=0, world_size=1)
    assert train.source_names() == ["x", "y", "z"] and train.weights == WEIGHTS


def test_sources_must_share_tokenizer_and_seq_len(tmp_path, sources, text_files, tokenizer_file):
    other = prepare_small(tmp_path / "short", text_files[:1], tokenizer_file, seq_len=16)
    with pytest.raises(DataError, match=r"short/manifest\.json: seq_len 16 differs from 32"):
        StreamingLoader([TokenDataset(sources[0].dir), TokenDataset(other.dir)], 4, rank=0, world_size=1)
    trained = prepare_small(tmp_path / "own", text_files[:1], None, vocab_size=300)
    with pytest.raises(DataError, match=r"own/manifest\.json: was tokenized with another tokenizer"):
        StreamingLoader([TokenDataset(sources[0].dir), TokenDataset(trained.dir)], 4, rank=0, world_size=1)
    _, loader = take(datasets(sources), 2)
    with pytest.raises(DataError, match="mixture weights"):
        take(datasets(sources), 1, weights=[1.0, 1.0, 1.0], state=loader.state_dict())


@pytest.mark.slow  # two short `mor train` runs, about 30 s on 2 shared cores
def test_mor_train_on_a_streamed_mixture_counts_tokens_per_source_and_resumes_exactly(sources, tmp_path):
    """`mor train` on one source over HTTP and one local (streamed: auto picks stream order for a URL),
    TensorBoard read back, then an interrupted run resumed: the same losses and counts."""
    from tests.training.conftest import run_mor, tb_scalars, tiny_overrides

    web, local = sources[1], sources[2]
    with serve(web.dir.parent) as (base, _, _):
        mix = (f"data.sources=[{{url: '{base}/{web.dir.name}', weight: 3, name: web}}, "
               f"{{dir: '{local.dir}', weight: 1, name: local}}]")

        def train(run_dir):
            r = run_mor(["train", "configs/tiny/mor.yaml", *tiny_overrides(
                local.dir, run_dir, train__steps=4, checkpoint__interval=2, train__eval_interval=2,
                data__num_workers=1, data__fetch_backoff_s=0.1), mix])
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            return tb_scalars(run_dir)

        full = train(tmp_path / "full")
        seen = full["train/tokens_seen"]
        web_tokens, local_tokens = full["data/tokens/web"], full["data/tokens/local"]
        assert sorted(seen) == [1, 2, 3, 4]
        assert all(web_tokens[s] + local_tokens[s] == seen[s] for s in seen)
        assert web_tokens[4] > local_tokens[4] > 0
        assert "val/loss" in full

        resumed = tmp_path / "resumed"  # as a run interrupted after its step-2 checkpoint leaves it
        shutil.copytree(tmp_path / "full", resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000004")
        shutil.rmtree(resumed / "tensorboard")
        (resumed / "checkpoints" / "latest").write_text("step_00000002")
        again = train(resumed)
    assert sorted(again["train/loss"]) == [3, 4]
    for tag in ("train/loss", "data/tokens/web", "data/tokens/local"):
        assert [again[tag][s] for s in (3, 4)] == [full[tag][s] for s in (3, 4)], tag
