"""manifest.json: what a prepared dataset holds and how to check it.

Written last by `mor data prepare` (atomically), so a directory with a manifest is a finished dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

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
    path: Path  # the manifest file; shards and tokenizer.json live next to it
    data: dict

    @property
    def dir(self) -> Path:
        return self.path.parent

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


def load_manifest(path: str | Path) -> Manifest:
    """From the manifest file or the dataset directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        hint = " (run `mor data prepare` first)" if not path.parent.exists() or not any(path.parent.iterdir()) else ""
        raise DataError(path, f"dataset manifest is missing{hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"manifest is not valid JSON: {e}") from None
    missing = [k for k in _REQUIRED if k not in data] if isinstance(data, dict) else list(_REQUIRED)
    if missing:
        raise DataError(path, f"manifest lacks {', '.join(missing)}")
    if data["format"] != FORMAT:
        raise DataError(path, f"manifest format {data['format']!r}, this reader understands {FORMAT!r}")
    if data.get("sample_field", FIELD) != FIELD or data.get("key_digits", KEY_DIGITS) != KEY_DIGITS:
        raise DataError(path, "manifest describes a different sample layout (field or key width)")
    return Manifest(path.resolve(), data)
