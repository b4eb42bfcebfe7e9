"""Full check of a prepared dataset (`mor data verify`): tokenizer, every shard's size and sha256,
optionally every sample. Meant to run once after copying a dataset, not at every start."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from mor_dist.data_pipeline import tokenizer as toklib
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.manifest import load_manifest
from mor_dist.data_pipeline.shards import ShardReader, check_file


def verify_dataset(dataset_dir: str | Path, read_samples: bool = False, progress: bool = True) -> list[str]:
    """Every problem found, as "path: problem" lines; empty when the dataset is intact."""
    m = load_manifest(dataset_dir)
    problems = []
    try:
        if toklib.file_fingerprint(m.dir / m.tokenizer["file"]) != m.tokenizer["fingerprint"]:
            problems.append(f"{m.dir / m.tokenizer['file']}: tokenizer fingerprint does not match the manifest")
    except DataError as e:
        problems.append(str(e))
    entries = [e for split in m.data["splits"] for e in m.shards(split)]
    for e in tqdm(entries, desc="verify", unit="shard", disable=not progress):
        path = m.dir / e["file"]
        problem = check_file(path, e, "sha256")
        if problem:
            problems.append(f"{path}: {problem}")
            continue
        if read_samples:
            r = ShardReader(path, m.layout, e["first_key"], e["samples"], m.tokenizer["vocab_size"])
            try:
                for i in range(e["samples"]):
                    r.read(i)
            except DataError as err:
                problems.append(str(err))
            finally:
                r.close()
    return problems
