"""Raw text inputs: resolving files/directories/globs, the default corpus, and reading documents.

A document is one plain-text file (.txt .text .md .rst .py), one line of a .jsonl file, or one row
of a .parquet file. Reading yields (text, ends_document) pieces so that a huge text file never has
to sit in memory whole.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from mor_dist.data_pipeline.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
# Directories of the standard library left out of the default corpus: test suites (large,
# repetitive, full of deliberately odd code), installed third-party packages and bytecode.
_DEFAULT_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

_READ_BYTES = 1 << 20
_PIECE_CHARS = 4 << 20  # plain-text files are tokenized in pieces of about this many characters


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
        out += [Path(d) / n for n in names if n.endswith(SUFFIXES) and not n.startswith(".")]
    return out


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (searched recursively for the supported suffixes) and globs (`**` allowed),
    as one sorted list without duplicates. Anything that matches nothing is an error."""
    found: set[Path] = set()
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise DataError(p, f"unsupported input type (supported: {', '.join(SUFFIXES)})")
            found.add(p.resolve())
        elif p.is_dir():
            found.update(f.resolve() for f in _walk(p))
        elif glob.has_magic(item):
            matched = [Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True)]
            for m in matched:
                if m.is_dir():
                    found.update(f.resolve() for f in _walk(m))
                elif m.name.endswith(SUFFIXES):
                    found.add(m.resolve())
            if not matched:
                raise DataError(item, "input pattern matches no files")
        else:
            raise DataError(p, "input file or directory does not exist")
    if not found:
        raise DataError(", ".join(inputs), f"no input files with a supported suffix ({', '.join(SUFFIXES)})")
    return sorted(found)


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


def _jsonl_docs(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}", f"not UTF-8 (byte {e.start + 1} of the line); save the file "
                                "as UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}", f"not valid JSON: {e}") from None
            text = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}", f"no string field {field!r}")
            yield text, True


def _parquet_docs(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(path, f"not a readable parquet file: {e}") from None
    if field not in pf.schema_arrow.names:
        raise DataError(path, f"no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(path, f"column {field!r} holds {kind}, not text; choose a string column with --text-field")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:  # null or empty rows carry no document
                yield text, True


def iter_pieces(path: str | Path, text_field: str = "text", piece_chars: int = _PIECE_CHARS) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) in file order; the EOS token goes after every piece that ends a document."""
    path = Path(path)
    if path.name.endswith(".jsonl"):
        return _jsonl_docs(path, text_field)
    if path.name.endswith(".parquet"):
        return _parquet_docs(path, text_field)
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
