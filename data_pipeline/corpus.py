"""Raw text inputs: resolving files/directories/globs, the default corpus, and reading documents.

A document is one plain-text file (.txt .text .md .rst .py), one line of a JSON-lines file (.jsonl,
and compressed .jsonl.gz .jsonl.zst .json.gz .json.zst), or one row of a .parquet or .arrow file
(Hugging Face save_to_disk folders hold .arrow files). The format comes from the name the file was
given -- a Hugging Face hub-cache symlink `x.parquet -> blobs/<sha>` is parquet -- and a file read as
text that holds binary data is refused. Reading yields (text, ends_document) pieces so that a huge
text file never has to sit in memory whole.

Parts: a large .jsonl is read in byte ranges (each range holds the lines that start in it) and a
parquet file in runs of row groups, so that several processes tokenize one file; the plan depends
only on the file, and the parts' documents in order are the file's.
"""

from __future__ import annotations

import codecs
import glob
import io
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from mor_dist.data_pipeline.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
TABLE_SUFFIXES = (".parquet", ".arrow")
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES
_CODECS = {".gz": "gzip", ".zst": "zstd"}
# First bytes of binary formats, for refusing them where text is expected.
_MAGIC = {b"PAR1": "parquet", b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"ARROW1": "arrow",
          b"\xff\xff\xff\xff": "arrow stream", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ": "xz"}
# Directories of the standard library left out of the default corpus: test suites (large,
# repetitive, full of deliberately odd code), installed third-party packages and bytecode.
_DEFAULT_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

_READ_BYTES = 1 << 20
PIECE_CHARS = 4 << 20  # plain-text files are tokenized in pieces of about this many characters


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard-library *.py sources, sorted: real text that exists
    offline on every machine that can run this code (about 12 MB for CPython 3.11)."""
    root = default_corpus_root()
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _DEFAULT_EXCLUDED_DIRS)
        files += [Path(d) / n for n in names if n.endswith(".py")]
    if not files:
        raise DataError(root, "default corpus: no *.py files in the standard library directory")
    return sorted(files)


def _walk(directory: Path) -> list[Path]:
    out = []
    for d, dirs, names in os.walk(directory):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        listed = _save_to_disk_files(Path(d), names)
        out += [Path(d) / n for n in names if n.endswith(SUFFIXES) and not n.startswith(".")
                and (listed is None or not n.endswith(".arrow") or n in listed)]
    return out


def _save_to_disk_files(d: Path, names: list[str]) -> set[str] | None:
    """The data files of a Hugging Face save_to_disk folder (its state.json lists them), so that other
    .arrow files there (caches) are not read; None where no such list is found."""
    if "state.json" not in names or not any(n.endswith(".arrow") for n in names):
        return None
    try:
        return {f["filename"] for f in json.loads((d / "state.json").read_text())["_data_files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # some other state.json: every .arrow file is an input


def binary_kind(path: Path) -> str | None:
    """What a file meant to hold text holds instead, judged by its first bytes: a format name, or
    None for text."""
    with open(path, "rb") as f:
        head = f.read(8192)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    return "binary" if b"\0" in head else None


def _check_text(p: Path) -> None:
    if p.name.endswith(TEXT_SUFFIXES + (".jsonl",)):
        kind = binary_kind(p)
        if kind is not None:
            raise DataError(p, f"holds {kind} data, not text; give the file a name that says its format "
                               f"({', '.join(JSONL_SUFFIXES[1:] + TABLE_SUFFIXES)}) or leave it out of the inputs")


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (searched recursively for the supported suffixes) and globs (`**` allowed),
    as one sorted list without duplicates. Anything that matches nothing is an error.

    Paths are made absolute but symlinks are not resolved: the name says the format (a hub-cache
    `train.parquet` links to `blobs/<sha>`). Two names of one file count once (the first in order)."""
    found: set[Path] = set()
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise DataError(p, f"unsupported input type (supported: {', '.join(SUFFIXES)})")
            found.add(_absolute(p))
        elif p.is_dir():
            found.update(_absolute(f) for f in _walk(p))
        elif glob.has_magic(item):
            matched = [Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True)]
            for m in matched:
                if m.is_dir():
                    found.update(_absolute(f) for f in _walk(m))
                elif m.name.endswith(SUFFIXES):
                    found.add(_absolute(m))
            if not matched:
                raise DataError(item, "input pattern matches no files")
        else:
            raise DataError(p, "input file or directory does not exist")
    if not found:
        raise DataError(", ".join(inputs), f"no input files with a supported suffix ({', '.join(SUFFIXES)})")
    files, targets = [], set()
    for f in sorted(found):
        target = f.resolve()
        if target not in targets:
            targets.add(target)
            _check_text(f)
            files.append(f)
    return files


def _absolute(p: Path) -> Path:
    return Path(os.path.abspath(p))


def _cuttable(buf: str, i: int) -> bool:
    """A newline with non-whitespace on both sides: the byte-level pre-tokenizer never joins it with
    its neighbours into one pre-token, so tokenizing the text in pieces cut just after it gives
    exactly the ids of tokenizing it whole."""
    return 0 < i < len(buf) - 1 and not buf[i - 1].isspace() and not buf[i + 1].isspace()


def _safe_cut(buf: str, lo: int, hi: int, scanned: int) -> int:
    """Index just after the last cuttable newline in [lo, hi), else after the first one at or beyond
    max(hi, scanned); -1 if there is none yet."""
    i = hi
    while (i := buf.rfind("\n", lo, i)) > lo:
        if _cuttable(buf, i):
            return i + 1
    i = max(hi, scanned)
    while (i := buf.find("\n", i)) >= 0:
        if _cuttable(buf, i):
            return i + 1
        i += 1
    return -1


def _text_pieces(path: Path, piece_chars: int) -> Iterator[tuple[str, bool]]:
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buf = ""
    scanned = 0  # buf[:scanned] is known to hold no cut beyond piece_chars
    with open(path, "rb") as f:
        while True:
            block = f.read(_READ_BYTES)
            buf += dec.decode(block, final=not block)
            while len(buf) > piece_chars:
                cut = _safe_cut(buf, piece_chars // 2, piece_chars, scanned)
                if cut < 0:
                    scanned = max(len(buf) - 1, 0)  # keep reading; an endless line is read whole
                    break
                yield buf[:cut], False
                buf, scanned = buf[cut:], 0
            if not block:
                break
    yield buf, True


def _line_number(path: Path, pos: int) -> int:
    """1-based number of the line starting at byte pos (counted only when an error is reported)."""
    n = 1
    with open(path, "rb") as f:
        while pos > 0:
            block = f.read(min(pos, 1 << 22))
            if not block:
                break
            n += block.count(b"\n")
            pos -= len(block)
    return n


def _lines(path: Path, start: int = 0, end: int | None = None):
    """(where, line) of the lines of a JSON-lines file that start in bytes [start, end); where gives
    the line number. Compressed files are read whole, start to end."""
    codec = _CODECS.get(path.suffix)
    if codec is not None:
        import pyarrow as pa

        try:
            with io.BufferedReader(pa.CompressedInputStream(pa.OSFile(str(path)), codec), 1 << 20) as f:
                for lineno, line in enumerate(f, 1):
                    yield (lambda n=lineno: n), line
        except OSError as e:  # pyarrow's codec errors
            raise DataError(path, f"not a readable {codec} file: {' '.join(str(e).split())}") from None
        return
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line holding byte start - 1: a line starting at `start` is ours
        pos = f.tell()
        while end is None or pos < end:
            line = f.readline()
            if not line:
                break
            yield (lambda at=pos: _line_number(path, at)), line
            pos += len(line)


def _jsonl_docs(path: Path, field: str, part=None) -> Iterator[tuple[str, bool]]:
    lo, hi = (part[1], part[2]) if part else (0, None)
    for where, line in _lines(path, lo, hi):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{where()}", f"not UTF-8 (byte {e.start + 1} of the line); save the file "
                            "as UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{where()}", f"not valid JSON: {e}") from None
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            if isinstance(obj, dict) and field in obj:
                kind = type(obj[field]).__name__
                raise DataError(f"{path}:{where()}", f"field {field!r} is of type {kind}, not a string; give every "
                                "line its text as a string, or another field with --text-field")
            keys = f" (its fields: {', '.join(list(obj)[:8])})" if isinstance(obj, dict) and obj else ""
            raise DataError(f"{path}:{where()}", f"no string field {field!r}{keys}; name the text's field with "
                            "--text-field (data.text_field)")
        yield text, True


def _text_column(path: Path, schema, field: str):
    import pyarrow as pa

    if field not in schema.names:
        raise DataError(path, f"no column {field!r} (columns: {', '.join(schema.names)}); choose one with --text-field")
    kind = schema.field(field).type
    is_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow >= 16
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise DataError(path, f"column {field!r} holds {kind}, not text; choose a string column with --text-field")


def _rows(columns) -> Iterator[tuple[str, bool]]:
    for column in columns:
        for text in column.to_pylist():
            if text:  # null or empty rows carry no document
                yield text, True


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(path, f"not a readable parquet file: {e}") from None


def _parquet_docs(path: Path, field: str, part=None) -> Iterator[tuple[str, bool]]:
    pf = _parquet_file(path)
    _text_column(path, pf.schema_arrow, field)
    groups = list(range(part[1], part[2])) if part else None
    return _rows(b.column(0) for b in pf.iter_batches(columns=[field], batch_size=1024, row_groups=groups))


def _arrow_docs(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    """An Arrow IPC file: the stream format Hugging Face save_to_disk writes, or the file format."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        try:
            reader = pa.ipc.open_stream(src)
            batches = iter(reader)
        except pa.ArrowInvalid:
            try:
                src.seek(0)
                reader = pa.ipc.open_file(src)
            except pa.ArrowInvalid as e:
                raise DataError(path, f"not an Arrow IPC file: {e}") from None
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        _text_column(path, reader.schema, field)
        yield from _rows(b.column(field) for b in batches)


def _part_target(size: int) -> int:
    return max(256 << 10, min(64 << 20, size // 64))


def plan_parts(path: str | Path) -> list[tuple]:
    """How one input file is split for tokenizing, as (part, bytes) pairs whose bytes sum to the file
    size: [(None, size)] (whole), or parts ("bytes", lo, hi) of a .jsonl and ("rows", first group,
    end group) of a parquet file, about size/64 each (256 KiB to 64 MiB: small enough that workers
    finish together). Depends only on the file."""
    path = Path(path)
    size = path.stat().st_size
    target = _part_target(size)
    if path.name.endswith(".jsonl") and size > target:
        return [(("bytes", lo, min(lo + target, size)), min(lo + target, size) - lo) for lo in range(0, size, target)]
    if path.name.endswith(".parquet"):
        meta = _parquet_file(path).metadata
        sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
        total = max(1, sum(sizes))
        target = _part_target(total)
        bounds, acc = [0], 0
        for i, n in enumerate(sizes):
            acc += n
            if acc >= target and i + 1 < len(sizes):
                bounds.append(i + 1)
                acc = 0
        bounds.append(len(sizes))
        if len(bounds) > 2:
            cum = [sum(sizes[:b]) for b in bounds]  # file bytes shared out in proportion to row-group sizes
            return [(("rows", lo, hi), size * cum[i + 1] // total - size * cum[i] // total)
                    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
    return [(None, size)]


def iter_pieces(path: str | Path, text_field: str = "text", piece_chars: int = PIECE_CHARS,
                part=None) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) in file order (of one part, see plan_parts); the EOS token goes after
    every piece that ends a document."""
    path = Path(path)
    if path.name.endswith(JSONL_SUFFIXES):
        return _jsonl_docs(path, text_field, part)
    if path.name.endswith(".parquet"):
        return _parquet_docs(path, text_field, part)
    if path.name.endswith(".arrow"):
        return _arrow_docs(path, text_field)
    return _text_pieces(path, piece_chars)


def iter_texts(files: list[Path], text_field: str = "text", max_bytes: int | None = None) -> Iterator[str]:
    """Text for tokenizer training, in file order, stopping after about max_bytes characters."""
    seen = 0
    for f in files:
        for text, _ in iter_pieces(f, text_field):
            yield text
            seen += len(text)
            if max_bytes is not None and seen >= max_bytes:
                return
