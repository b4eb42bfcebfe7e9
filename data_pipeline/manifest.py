"""manifest.json: what a prepared dataset holds and how to check it.

Written last by `mor data prepare` (atomically), so a directory with a manifest is a finished dataset.
A dataset may also be read from a URL (data_pipeline/remote.py): its manifest and tokenizer are
fetched, and a shard entry may carry its own "url" (shards spread over other places).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mor_dist.data_pipeline import remote
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.shards import FIELD, KEY_DIGITS, Layout

FORMAT = "mor_dist.tokens.v1"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Manifest:
    path: Path | str  # the manifest file (a URL for a remote dataset); shards and tokenizer.json live next to it
    data: dict
    base: str = ""  # the dataset's location as given: a directory or a URL (remote.join appends file names)

    @property
    def dir(self) -> Path | None:
        """The local dataset directory; None for a remote dataset."""
        return self.path.parent if isinstance(self.path, Path) else None

    def locate(self, name: str) -> str:
        """Path or URL of a file of this dataset."""
        return str(self.dir / name) if self.dir is not None else remote.join(self.base, name)

    def shard_location(self, entry: dict) -> str:
        return entry.get("url") or self.locate(entry["file"])

    @property
    def seq_len(self) -> int:
        return self.data["seq_len"]

    @property
    def layout(self) -> Layout:
        return Layout(self.data["seq_len"] + 1, self.data["dtype"])

    @property
    def tokenizer(self) -> dict:
        return self.data["tokenizer"]

    def shards(self, split: str) -> list[dict]:
        splits = self.data["splits"]
        if split not in splits:
            raise DataError(self.path, f"no split {split!r} (splits: {', '.join(splits)})")
        return splits[split]["shards"]

    def fingerprint(self, split: str) -> str:
        """Identity of a split's sample stream: same tokens in the same shards."""
        h = hashlib.sha256(f"{FORMAT}|{split}|{self.seq_len}|{self.tokenizer['fingerprint']}".encode())
        for s in self.shards(split):
            h.update(f"|{s['file']}:{s['samples']}:{s['sha256']}".encode())
        return h.hexdigest()


_REQUIRED = ("format", "seq_len", "dtype", "tokenizer", "splits")


def load_manifest(path: str | Path, policy: remote.FetchPolicy | None = None) -> Manifest:
    """From the manifest file or the dataset directory holding it, local or at a URL."""
    loc = str(path)
    local = remote.local_path(loc)
    if local is None:
        remote.check_location(loc)
        url = remote.join(loc, MANIFEST)
        return _parse(url, remote.read_text(url, policy or remote.FetchPolicy(), "dataset manifest"), loc)
    path = local
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        folder = path.parent if path.name == MANIFEST else path  # a dataset folder that does not exist yet
        empty = not folder.is_dir() or not any(folder.iterdir())
        hint = ("run `mor data prepare --config CONFIG` with this run's config first (it writes data.dataset_dir)"
                if empty else "point data.dataset_dir at a prepared dataset (`mor data prepare` writes one)")
        raise DataError(path, f"dataset manifest is missing; {hint}")
    return _parse(path.resolve(), path.read_bytes().decode("utf-8", "replace"), str(path.resolve().parent))


def _parse(path: Path | str, text: str, base: str) -> Manifest:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"manifest is not valid JSON: {e}") from None
    missing = [k for k in _REQUIRED if k not in data] if isinstance(data, dict) else list(_REQUIRED)
    if missing:
        raise DataError(path, f"manifest lacks {', '.join(missing)}")
    if data["format"] != FORMAT:
        raise DataError(path, f"manifest format {data['format']!r}, this reader understands {FORMAT!r}")
    if data.get("sample_field", FIELD) != FIELD or data.get("key_digits", KEY_DIGITS) != KEY_DIGITS:
        raise DataError(path, "manifest describes a different sample layout (field or key width)")
    return Manifest(path, data, base)
