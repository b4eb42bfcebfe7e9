"""Checksums of checkpoint files: computed while the bytes are written, checked before they are read.

meta.json records {"size": bytes, "sha256": hex} per file. A file written through `HashingWriter`
is hashed on its way to disk (no second read of a multi-GB shard); anything else in the folder is
hashed after the fact. `checkpoint.verify` picks how much a reader checks: sha256 (every byte),
size (cheap; catches truncation only) or none.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from mor_dist.checkpoint.errors import CheckpointError

VERIFY_MODES = ("sha256", "size", "none")
_CHUNK = 8 << 20


class HashingWriter(io.RawIOBase):
    """A write-only binary file that hashes what passes through and fsyncs on close."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._sha = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None  # torch's zip writer re-raises ours as a bare RuntimeError

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            n = self._f.write(b)
        except OSError as e:
            self.error = e
            raise
        self._sha.update(memoryview(b)[:n])
        self.size += n
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            finally:
                self._f.close()
        super().close()

    def record(self) -> dict:
        return {"size": self.size, "sha256": self._sha.hexdigest()}


def file_record(path: Path) -> dict:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def check_file(folder: Path, rel: str, record, mode: str, listed_in: Path) -> str | None:
    """None when folder/rel matches its record, else what is wrong (one line, file first)."""
    if mode == "none":
        return None
    if isinstance(record, int):  # checkpoints written before checksums: sizes only
        record = {"size": record}
    f = folder / rel
    if not f.is_file():
        return f"{f}: missing (listed in {listed_in})"
    size = f.stat().st_size
    if size != record["size"]:
        return f"{f}: {size} bytes, {listed_in} recorded {record['size']}: truncated or replaced"
    if mode == "sha256" and "sha256" in record and file_record(f)["sha256"] != record["sha256"]:
        return f"{f}: contents differ from the sha256 recorded in {listed_in}: the file is corrupt"
    return None


def verify_files(folder: Path, files: dict, mode: str, listed_in: Path, part: tuple[int, int] = (0, 1)) -> None:
    """Raise CheckpointError for the first bad file among this part (index, count) of `files`: ranks
    of a job each check a slice, so a resume reads every byte once, spread over the ranks."""
    if mode not in VERIFY_MODES:
        raise CheckpointError(f"checkpoint.verify={mode!r} is not one of {VERIFY_MODES}")
    index, count = part
    for rel in sorted(files)[index::count]:
        problem = check_file(folder, rel, files[rel], mode, listed_in)
        if problem:
            raise CheckpointError(problem)
