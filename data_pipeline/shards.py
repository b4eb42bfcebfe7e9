"""The shard format: WebDataset-compatible tar files of fixed-size token samples.

Each sample is one tar member named `<key>.tokens.npy`: key = the sample's index within its split,
zero-padded to 10 digits; content = a NumPy .npy file holding a 1-D little-endian uint16 (uint32 for
vocabularies over 65536) array of seq_len + 1 token ids. Plain `webdataset.WebDataset(url).decode()`
yields {"__key__": key, "tokens.npy": array}.

All members have the same size and headers are plain USTAR (no pax records), so member i sits at
byte i * stride. Readers seek straight to a sample instead of scanning the tar, and check the header
they find there (name, size, checksum) against the one expected, which catches truncated, shifted or
overwritten shards.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mor_dist.data_pipeline.errors import BAD_SHARD_HINT, DataError

FIELD = "tokens.npy"
KEY_DIGITS = 10
BLOCK = 512
RECORD = 20 * BLOCK  # tar archives are padded to whole records (what tarfile and GNU tar write)


def _npy_header(dtype: str, n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": (n,)})
    return buf.getvalue()


def _tar_header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o444, 0, 0, "", ""
    return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def member_name(key: int) -> str:
    return f"{key:0{KEY_DIGITS}d}.{FIELD}"


@dataclass(frozen=True)
class Layout:
    """Byte layout of a shard, fixed by the sample length and the token dtype."""

    sample_tokens: int  # seq_len + 1
    dtype: str  # "<u2" or "<u4"

    @property
    def npy_header(self) -> bytes:
        return _npy_header(self.dtype, self.sample_tokens)

    @property
    def data_size(self) -> int:
        return len(self.npy_header) + self.sample_tokens * np.dtype(self.dtype).itemsize

    @property
    def stride(self) -> int:
        """Bytes per member: header block + data padded to whole blocks."""
        return BLOCK + -(-self.data_size // BLOCK) * BLOCK

    def file_size(self, samples: int) -> int:
        """Members + the two zero end blocks, padded to whole records."""
        return -(-(samples * self.stride + 2 * BLOCK) // RECORD) * RECORD


class ShardWriter:
    """Writes one shard to `<path>.tmp.<pid>` and renames it into place only when complete, so a
    shard file that exists under its final name is always whole."""

    def __init__(self, path: str | Path, layout: Layout, first_key: int):
        self.path = Path(path)
        self.layout = layout
        self.first_key = first_key
        self.samples = 0
        self._tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}")
        self._f = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._npy = layout.npy_header
        self._pad = b"\0" * (layout.stride - BLOCK - layout.data_size)

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self._sha.update(b)

    def add(self, tokens: np.ndarray) -> None:
        if tokens.shape != (self.layout.sample_tokens,):
            raise ValueError(f"sample has shape {tokens.shape}, expected ({self.layout.sample_tokens},)")
        data = self._npy + np.ascontiguousarray(tokens, dtype=self.layout.dtype).tobytes()
        self._write(_tar_header(member_name(self.first_key + self.samples), len(data)) + data + self._pad)
        self.samples += 1

    def close(self) -> dict:
        """Finishes the archive, makes it durable, renames it into place; returns its manifest entry."""
        size = self.samples * self.layout.stride
        end = self.layout.file_size(self.samples)
        self._write(b"\0" * (end - size))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return {
            "file": self.path.name,
            "first_key": self.first_key,
            "samples": self.samples,
            "tokens": self.samples * self.layout.sample_tokens,
            "bytes": end,
            "sha256": self._sha.hexdigest(),
        }

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, entry: dict, verify: str) -> str | None:
    """The problem with a shard file as the manifest describes it, or None when it looks whole.
    verify: none | size | sha256."""
    if verify == "none":
        return None
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "shard is missing"
    if size < entry["bytes"]:
        return f"shard is truncated: {size} bytes, the manifest says {entry['bytes']}"
    if size != entry["bytes"]:
        return f"shard size {size} bytes does not match the manifest's {entry['bytes']}"
    if verify == "sha256":
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            return f"shard sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}... (corrupt)"
    return None


class _SampleChecks:
    """The checks of every sample read: the tar header must be the one expected for its key (name,
    size, checksum), the .npy header must match, and every id must be below the vocabulary size."""

    def __init__(self, where: str | Path, layout: Layout, first_key: int, samples: int, vocab_size: int):
        self.path = where
        self.layout = layout
        self.first_key = first_key
        self.samples = samples
        self.vocab_size = vocab_size
        self._npy = layout.npy_header
        self._n_npy = len(self._npy)
        # The tar header differs between samples only in the name and the checksum over it.
        tmpl = bytearray(_tar_header(member_name(0), layout.data_size))
        self._tmpl_mid = bytes(tmpl[100:148])
        self._tmpl_tail = bytes(tmpl[156:])
        self._tmpl_sum = sum(tmpl[100:148]) + 8 * ord(" ") + sum(tmpl[156:])

    def _expected_header(self, key: int) -> bytes:
        name = member_name(key).encode().ljust(100, b"\0")
        chk = b"%06o\0 " % (self._tmpl_sum + sum(name))
        return name + self._tmpl_mid + chk + self._tmpl_tail

    def _where(self, i: int) -> str:
        return f"sample {i} (key {self.first_key + i:0{KEY_DIGITS}d})"

    def _checked(self, buf, i: int) -> np.ndarray:
        """buf: the member's header block and data (at least BLOCK + data_size bytes)."""
        if buf[:BLOCK] != self._expected_header(self.first_key + i):
            raise DataError(self.path, f"corrupt tar header at {self._where(i)}: not the member the manifest describes")
        if buf[BLOCK : BLOCK + self._n_npy] != self._npy:
            raise DataError(self.path, f"corrupt .npy header in {self._where(i)}")
        arr = np.frombuffer(buf, dtype=self.layout.dtype, count=self.layout.sample_tokens, offset=BLOCK + self._n_npy)
        if arr.max() >= self.vocab_size:
            raise DataError(self.path, f"corrupt {self._where(i)}: token id {int(arr.max())} >= vocab size "
                                       f"{self.vocab_size}")
        return arr

    def close(self) -> None:
        pass


class ShardReader(_SampleChecks):
    """Random access to the samples of one local shard: one positioned read of member i per sample."""

    def __init__(self, path: str | Path, layout: Layout, first_key: int, samples: int, vocab_size: int):
        self._fd = -1
        super().__init__(Path(path), layout, first_key, samples, vocab_size)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise DataError(self.path, f"shard is missing; {BAD_SHARD_HINT}") from None
        except OSError as e:
            raise DataError(self.path, f"cannot open shard: {e.strerror}") from None

    def read(self, i: int) -> np.ndarray:
        """Sample i of this shard (0 <= i < samples) as a read-only array of the stored dtype."""
        lay = self.layout
        try:
            buf = os.pread(self._fd, BLOCK + lay.data_size, i * lay.stride)
        except OSError as e:
            raise DataError(self.path, f"read error at {self._where(i)}: {e.strerror}") from None
        if len(buf) < BLOCK + lay.data_size:
            raise DataError(self.path, f"shard is truncated: {self._where(i)} is cut off at byte "
                                       f"{i * lay.stride + len(buf)}")
        return self._checked(buf, i)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


class MemoryShard(_SampleChecks):
    """A whole shard fetched into memory (from a URL or a pipe, already checked against the
    manifest's size and sha256); samples are read from it like from a local file."""

    def __init__(self, data: bytes, where: str, layout: Layout, first_key: int, samples: int, vocab_size: int):
        super().__init__(where, layout, first_key, samples, vocab_size)
        self._data = memoryview(data)

    def read(self, i: int) -> np.ndarray:
        lay = self.layout
        buf = self._data[i * lay.stride : i * lay.stride + BLOCK + lay.data_size]
        if len(buf) < BLOCK + lay.data_size:
            raise DataError(self.path, f"shard is truncated: {self._where(i)} is cut off")
        return self._checked(buf, i)
