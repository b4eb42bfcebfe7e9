"""Fixtures: real text (../shared's tinyshakespeare when present, else standard-library sources) and
a small prepared dataset shared by the loader tests."""

from __future__ import annotations

import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch

from mor_dist.data_pipeline.corpus import default_corpus_files
from mor_dist.data_pipeline.loader import StreamingLoader
from mor_dist.data_pipeline.prepare import prepare_dataset
from tests.conftest import SHARED_TEXT, use_shared_text


# Small enough for a fast test suite, big enough for several shards and a val split.
SEQ_LEN = 32
VOCAB = 512
SHARD_SAMPLES = 100
VAL_FRACTION = 0.02


def real_text_files(tmp_dir: Path, max_bytes: int) -> list[Path]:
    """About max_bytes of real text: a cut of tinyshakespeare split into three files when ../shared
    has it (MOR_TEST_NO_SHARED=1 pretends it does not), else whole standard-library sources."""
    if use_shared_text():
        text = SHARED_TEXT.read_text(encoding="utf-8")[:max_bytes]
        tmp_dir.mkdir(parents=True, exist_ok=True)
        parts = [text[i * len(text) // 3 : (i + 1) * len(text) // 3] for i in range(3)]
        files = [tmp_dir / f"part{i}.txt" for i in range(3)]
        for f, part in zip(files, parts):
            f.write_text(part, encoding="utf-8")
        return files
    out, total = [], 0
    for f in default_corpus_files():
        size = f.stat().st_size
        if 2_000 <= size <= max_bytes // 4:  # several mid-sized files rather than one huge one
            out.append(f)
            total += size
            if total >= max_bytes:
                break
    return out


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> list[Path]:
    return real_text_files(tmp_path_factory.mktemp("text"), 120_000)


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory, text_files) -> Path:
    from mor_dist.data_pipeline.corpus import iter_texts
    from mor_dist.data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(iter_texts(text_files), VOCAB), path)
    return path


def prepare_small(out: Path, text_files, tokenizer_file, **kw):
    args = dict(seq_len=SEQ_LEN, tokenizer=tokenizer_file, val_fraction=VAL_FRACTION,
                shard_samples=SHARD_SAMPLES, workers=1, progress=False)
    args.update(kw)
    return prepare_dataset(out, [str(f) for f in text_files], **args)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, text_files, tokenizer_file):
    """The prepared small dataset (read-only: copy it with `dataset_copy` before damaging it)."""
    return prepare_small(tmp_path_factory.mktemp("ds") / "small", text_files, tokenizer_file)


@pytest.fixture
def dataset_copy(tmp_path, dataset) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(dataset.dir, dst)
    return dst


def take(ds, n, *, batch=8, rank=0, world=1, workers=0, seed=7, state=None, **loader_kwargs):
    """n batches from a fresh loader (all it has if n is None) and its state afterwards."""
    loader = StreamingLoader(ds, batch, seed=seed, rank=rank, world_size=world, num_workers=workers,
                             prefetch_factor=2, **loader_kwargs)
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    out = list(islice(it, n))
    it.close()
    return out, loader.state_dict()


def cat(batches, field="tokens"):
    return torch.cat([b[field] for b in batches])
