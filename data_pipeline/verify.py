"""Full check of a prepared dataset (`mor data verify`): tokenizer, every shard's size and sha256,
optionally every sample. Meant to run once after copying a dataset, not at every start. A dataset at
a URL is fetched shard by shard (size and sha256 are checked on the way in)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from mor_dist.data_pipeline import remote
from mor_dist.data_pipeline import tokenizer as toklib
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.manifest import load_manifest
from mor_dist.data_pipeline.shards import MemoryShard, ShardReader, check_file


def verify_dataset(dataset_dir: str | Path, read_samples: bool = False, progress: bool = True,
                   fetch: remote.FetchPolicy | None = None) -> list[str]:
    """Every problem found, as "path: problem" lines; empty when the dataset is intact."""
    fetch = fetch or remote.FetchPolicy()
    m = load_manifest(dataset_dir, fetch)
    problems = []
    tok = m.locate(m.tokenizer["file"])
    try:
        if toklib.fingerprint(remote.read_text(tok, fetch, "tokenizer")) != m.tokenizer["fingerprint"]:
            problems.append(f"{tok}: tokenizer fingerprint does not match the manifest")
    except DataError as e:
        problems.append(f"{tok}: {e.problem}")
    entries = [e for split in m.data["splits"] for e in m.shards(split)]
    for e in tqdm(entries, desc="verify", unit="shard", disable=not progress):
        loc = m.shard_location(e)
        path = remote.local_path(loc)
        args = (m.layout, e["first_key"], e["samples"], m.tokenizer["vocab_size"])
        if path is not None:
            problem = check_file(path, e, "sha256")
            if problem:
                problems.append(f"{path}: {problem}")
                continue
            reader = ShardReader(path, *args) if read_samples else None
        else:
            try:
                data = remote.fetch(loc, fetch, e["bytes"], e["sha256"], what="shard")
            except DataError as err:
                problems.append(str(err))
                continue
            reader = MemoryShard(data, loc, *args) if read_samples else None
        if reader is not None:
            try:
                for i in range(e["samples"]):
                    reader.read(i)
            except DataError as err:
                problems.append(str(err))
            finally:
                reader.close()
    return problems
