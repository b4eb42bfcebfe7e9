"""`mor data prepare`: raw text -> tokenizer -> packed samples in WebDataset shards + manifest.

Stages, each restartable:
1. tokenizer: the given tokenizer.json, or a byte-level BPE trained on the inputs (saved first, reused
   on a rerun);
2. tokenize: input files in parallel (one task per file) into per-file id caches under .prepare/tok/
   (EOS after every document); a file whose cache exists is not tokenized again;
3. pack: the caches in sorted file order form one token stream, cut into samples of seq_len + 1 ids
   that start every seq_len ids (consecutive samples share one token, so every token in the stream
   is a prediction target exactly once). An evenly spread val_fraction of samples goes to the val
   split. Shards go to a temp name and are renamed when whole; finished shards are journalled in
   .prepare/done/ and not written again on a rerun.
4. manifest.json is written last; then .prepare/ is removed.
Packing depends only on the file order, never on the number of workers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mor_dist.data_pipeline import tokenizer as toklib
from mor_dist.data_pipeline.corpus import default_corpus_files, iter_pieces, iter_texts, resolve_inputs
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.manifest import FORMAT, MANIFEST, TOKENIZER, Manifest, load_manifest, write_json_atomic
from mor_dist.data_pipeline.shards import FIELD, KEY_DIGITS, Layout, ShardWriter

log = logging.getLogger("mor_dist.data")

WORK = ".prepare"
_PACK_BLOCK = 1 << 22  # tokens read from a cache at a time while packing
_ENCODE_BATCH_CHARS = 1 << 20


def _inputs_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _spread(files: list[Path]) -> list[Path]:
    """A fixed shuffle, so that a capped tokenizer-training sample covers the whole corpus."""
    files = list(files)
    random.Random(0).shuffle(files)
    return files


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextmanager
def _locked(work: Path):
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(work.parent, "another `mor data prepare` is writing this directory") from None
        yield


def _remove_temps(*dirs: Path) -> None:
    """Half-written files of an interrupted run: never used, always rewritten."""
    for d in dirs:
        if d.is_dir():
            for p in d.iterdir():
                if ".tmp." in p.name:
                    p.unlink()


# ---- tokenize ----

_worker_tok = None


def _init_worker(tok_path: str) -> None:
    global _worker_tok
    _worker_tok = toklib.load_tokenizer(tok_path)
    _worker_tok.encode_special_tokens = True  # "<|endoftext|>" inside a document is just text


def _encode(tok, texts: list[str]) -> list[list[int]]:
    enc = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in enc(texts, add_special_tokens=False)]


def _tokenize_file(task: tuple) -> dict:
    """One input file -> its id cache (uint16/uint32 raw) + a stats sidecar, both atomically."""
    src, dst, text_field, eos_id, dtype = task
    tok = _worker_tok
    tmp = f"{dst}.tmp.{os.getpid()}"
    docs = tokens = 0
    doc_tokens = 0
    with open(tmp, "wb") as f:
        batch: list[tuple[str, bool]] = []
        chars = 0

        def flush():
            nonlocal docs, tokens, doc_tokens
            for (_, ends), ids in zip(batch, _encode(tok, [t for t, _ in batch])):
                if ids:
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                doc_tokens += len(ids)
                if ends and doc_tokens:  # an empty document leaves no trace, not even an EOS
                    f.write(np.asarray([eos_id], dtype=dtype).tobytes())
                    docs += 1
                    tokens += doc_tokens + 1
                    doc_tokens = 0
            batch.clear()

        for text, ends in iter_pieces(src, text_field):
            batch.append((text, ends))
            chars += len(text)
            if chars >= _ENCODE_BATCH_CHARS:
                flush()
                chars = 0
        flush()
    stats = {"source": src, "bytes": os.path.getsize(src), "documents": docs, "tokens": tokens}
    write_json_atomic(Path(dst + ".json"), stats)
    os.replace(tmp, dst)
    return stats


def _cached_stats(dst: Path, itemsize: int) -> dict | None:
    side = Path(f"{dst}.json")
    if not (dst.is_file() and side.is_file()):
        return None
    stats = json.loads(side.read_text())
    return stats if dst.stat().st_size == stats["tokens"] * itemsize else None


@contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _tokenize_all(files, tok_dir: Path, tok_path: Path, text_field, eos_id, dtype, workers, progress) -> list[dict]:
    tok_dir.mkdir(parents=True, exist_ok=True)
    itemsize = np.dtype(dtype).itemsize
    dsts = [tok_dir / f"{i:08d}.bin" for i in range(len(files))]
    stats: list[dict | None] = [_cached_stats(d, itemsize) for d in dsts]
    todo = [i for i, s in enumerate(stats) if s is None]
    todo.sort(key=lambda i: -files[i].stat().st_size)  # biggest first balances the pool
    sizes = [f.stat().st_size for f in files]
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="tokenize", disable=not progress)
    bar.update(sum(sizes) - sum(sizes[i] for i in todo))
    if len(files) > len(todo):
        log.info("tokenize: %d of %d files already done by an earlier run", len(files) - len(todo), len(files))
    tasks = {i: (str(files[i]), str(dsts[i]), text_field, eos_id, dtype) for i in todo}
    try:
        if workers <= 1 or len(todo) <= 1:
            _init_worker(str(tok_path))
            for i in todo:
                stats[i] = _tokenize_file(tasks[i])
                bar.update(sizes[i])
        else:
            # Each pool process encodes one file at a time on one thread; without this the Rust
            # side would also spread every batch over all cores (and warn about the fork).
            with _env("TOKENIZERS_PARALLELISM", "false"):
                pool = mp.get_context("fork").Pool(min(workers, len(todo)), _init_worker, (str(tok_path),))
            with pool:
                order = [tasks[i] for i in todo]
                for i, st in zip(todo, pool.imap(_tokenize_file, order)):
                    stats[i] = st
                    bar.update(sizes[i])
    finally:
        bar.close()
    return stats


# ---- pack ----


class _SplitWriter:
    """Rolls shards of one split; a shard journalled as done by an earlier run is only counted."""

    def __init__(self, out: Path, split: str, layout: Layout, shard_samples: int, journal: Path):
        self.out, self.split, self.layout, self.per_shard, self.journal = out, split, layout, shard_samples, journal
        self.entries: list[dict] = []
        self.count = 0
        self.reused = 0
        self._writer: ShardWriter | None = None
        self._done: dict | None = None
        self._n = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.entries):06d}.tar"
        jfile = self.journal / f"{name}.json"
        if jfile.is_file():
            entry = json.loads(jfile.read_text())
            f = self.out / name
            if f.is_file() and f.stat().st_size == entry["bytes"] and entry["first_key"] == self.count:
                self._done = entry
                return
        self._writer = ShardWriter(self.out / name, self.layout, first_key=self.count)

    def add(self, sample: np.ndarray) -> None:
        if self._n == 0:
            self._open()
        if self._writer is not None:
            self._writer.add(sample)
        self._n += 1
        self.count += 1
        if self._n == self.per_shard:
            self._close()

    def _close(self) -> None:
        if self._writer is not None:
            entry = self._writer.close()
            write_json_atomic(self.journal / f"{entry['file']}.json", entry)
            self._writer = None
        else:
            entry, self._done = self._done, None
            if entry["samples"] != self._n:
                raise DataError(self.out / entry["file"], "journal of the earlier run does not match; rerun with --overwrite")
            self.reused += 1
        self.entries.append(entry)
        self._n = 0

    def finish(self) -> dict:
        if self._n:
            self._close()
        return {
            "samples": self.count,
            "tokens": self.count * self.layout.sample_tokens,
            "shards": self.entries,
        }

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def val_rule(val_fraction: float):
    """is_val(k): whether sample k of the packed stream is held out. Exactly floor(n * val_fraction)
    of the first n samples are, evenly spread; exact rational arithmetic, so 0.02 means every 50th."""
    f = Fraction(val_fraction).limit_denominator(1 << 30)
    num, den = f.numerator, f.denominator
    return lambda k: (k + 1) * num // den > k * num // den


def _pack(caches: list[Path], out: Path, layout: Layout, seq_len: int, val_fraction: float, shard_samples: int,
          journal: Path, total_tokens: int, progress: bool) -> tuple[dict, int]:
    journal.mkdir(parents=True, exist_ok=True)
    writers = {s: _SplitWriter(out, s, layout, shard_samples, journal) for s in ("train", "val")}
    width = seq_len + 1
    carry = np.empty(0, dtype=layout.dtype)
    k = 0
    is_val = val_rule(val_fraction)
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="pack", disable=not progress)
    try:
        for cache in caches:
            if cache.stat().st_size == 0:
                continue
            ids = np.memmap(cache, dtype=layout.dtype, mode="r")
            for start in range(0, len(ids), _PACK_BLOCK):
                block = ids[start : start + _PACK_BLOCK]
                buf = np.concatenate([carry, block])
                bar.update(len(block))
                if len(buf) < width:
                    carry = buf
                    continue
                n = (len(buf) - 1) // seq_len
                for win in np.lib.stride_tricks.sliding_window_view(buf, width)[::seq_len][:n]:
                    writers["val" if is_val(k) else "train"].add(win)
                    k += 1
                carry = buf[n * seq_len :]
            del ids
        splits = {s: w.finish() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    reused = sum(w.reused for w in writers.values())
    if reused:
        log.info("pack: %d finished shards of an earlier run kept as they are", reused)
    # Tokens after the last full sample are not in any sample (the last sample's final token is).
    tail = len(carry) - 1 if k else len(carry)
    return splits, tail


# ---- driver ----


def prepare_dataset(
    out_dir: str | Path,
    inputs: list[str] | None = None,
    *,
    seq_len: int = 2048,
    tokenizer: str | Path | None = None,
    vocab_size: int = 4096,
    eos_token: str = toklib.DEFAULT_EOS,
    pad_token: str = toklib.DEFAULT_PAD,
    tokenizer_train_bytes: int = 1 << 30,
    text_field: str = "text",
    val_fraction: float = 0.005,
    shard_samples: int = 4096,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Builds (or finishes, or confirms) a prepared dataset in out_dir; returns its manifest.

    inputs: files/directories/globs; None or empty = the default corpus (standard-library sources).
    tokenizer: an existing tokenizer.json; None = train a byte-level BPE of vocab_size on the inputs.
    Rerunning after an interruption continues where it stopped; rerunning a finished preparation
    with the same settings returns at once; different settings need overwrite=True.
    """
    if seq_len < 1 or shard_samples < 1 or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"need seq_len >= 1, shard_samples >= 1, 0 <= val_fraction < 1 "
                         f"(got {seq_len}, {shard_samples}, {val_fraction})")
    out = Path(out_dir).expanduser().resolve()
    files = resolve_inputs(list(inputs)) if inputs else default_corpus_files()
    given_tok = Path(tokenizer).expanduser().resolve() if tokenizer else None
    params = {
        "format": FORMAT,
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "shard_samples": shard_samples,
        "text_field": text_field,
        "eos_token": eos_token,
        "inputs_files": len(files),
        "inputs_sha256": _inputs_digest(files),
        "tokenizer_source": toklib.file_fingerprint(given_tok) if given_tok else "trained",
    }
    if not given_tok:
        params.update(vocab_size=vocab_size, pad_token=pad_token, tokenizer_train_bytes=tokenizer_train_bytes)
    work = out / WORK
    out.mkdir(parents=True, exist_ok=True)
    with _locked(work):
        if overwrite:
            _clear(out, keep=given_tok)
        if (out / MANIFEST).exists():
            m = load_manifest(out)
            if m.data.get("prepare") == params:
                log.info("%s: already prepared with these settings", out)
                shutil.rmtree(work, ignore_errors=True)
                return m
            raise DataError(out, "holds a dataset prepared with other settings or inputs "
                            f"({_diff(m.data.get('prepare', {}), params)}); pass --overwrite to rebuild it")
        pfile = work / "params.json"
        if pfile.is_file():
            old = json.loads(pfile.read_text())
            if old != params:
                raise DataError(out, "holds an unfinished preparation with other settings or inputs "
                                f"({_diff(old, params)}); pass --overwrite to start over")
            log.info("%s: continuing an interrupted preparation", out)
        else:
            write_json_atomic(pfile, params)
        _remove_temps(out, work, work / "tok", work / "done")

        tok_path = out / TOKENIZER
        if given_tok:
            if not tok_path.is_file() or toklib.file_fingerprint(tok_path) != params["tokenizer_source"]:
                shutil.copyfile(given_tok, work / "tokenizer.json.tmp.copy")
                os.replace(work / "tokenizer.json.tmp.copy", tok_path)
        elif not tok_path.is_file():
            log.info("training a %d-entry byte-level BPE on %d files", vocab_size, len(files))
            tok = toklib.train_tokenizer(
                iter_texts(_spread(files), text_field, tokenizer_train_bytes), vocab_size, eos_token, pad_token)
            toklib.save_tokenizer(tok, tok_path)
        tok = toklib.load_tokenizer(tok_path)
        fp = toklib.file_fingerprint(tok_path)
        eos_id = toklib.special_id(tok, eos_token, given_tok or tok_path)
        pad_id = tok.token_to_id(pad_token)
        vocab = tok.get_vocab_size()
        dtype = toklib.token_dtype(vocab)
        layout = Layout(seq_len + 1, dtype)

        stats = _tokenize_all(files, work / "tok", tok_path, text_field, eos_id, dtype,
                              workers or _cpu_count(), progress)
        total = sum(s["tokens"] for s in stats)
        caches = [work / "tok" / f"{i:08d}.bin" for i in range(len(files))]
        splits, tail = _pack(caches, out, layout, seq_len, val_fraction, shard_samples, work / "done", total, progress)
        if splits["train"]["samples"] == 0:
            raise DataError(out, f"the inputs hold {total} tokens: not enough for one sample of {seq_len + 1}")
        if val_fraction > 0 and splits["val"]["samples"] == 0:
            log.warning("%s: val split is empty (%d samples x val_fraction %g < 1)", out,
                        splits["train"]["samples"], val_fraction)
        manifest = {
            "format": FORMAT,
            "seq_len": seq_len,
            "sample_tokens": seq_len + 1,
            "pack_stride": seq_len,
            "dtype": dtype,
            "sample_field": FIELD,
            "key_digits": KEY_DIGITS,
            "tokenizer": {
                "file": TOKENIZER, "fingerprint": fp, "vocab_size": vocab,
                "eos_token": eos_token, "eos_id": eos_id, "pad_token": pad_token, "pad_id": pad_id,
            },
            "val_fraction": val_fraction,
            "splits": splits,
            "corpus": {
                "files": len(files),
                "documents": sum(s["documents"] for s in stats),
                "bytes": sum(s["bytes"] for s in stats),
                "tokens": total,
                "tokens_after_last_sample": tail,
                "default_corpus": not inputs,
            },
            "prepare": params,
        }
        write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    log.info("%s: %d train + %d val samples of %d tokens", out, splits["train"]["samples"],
             splits["val"]["samples"], seq_len + 1)
    return load_manifest(out)


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "unknown difference"


def _clear(out: Path, keep: Path | None) -> None:
    """What an earlier preparation wrote: shards, manifest, tokenizer copy (unless it is the
    tokenizer to use now), work dir."""
    for p in out.iterdir():
        if p == keep:
            continue
        if p.name == WORK:
            for q in p.iterdir():
                if q.name != "lock":
                    shutil.rmtree(q) if q.is_dir() else q.unlink()
        elif p.name in (MANIFEST, TOKENIZER) or (p.name.startswith(("train-", "val-")) and ".tar" in p.name):
            p.unlink()


def prepare_from_config(cfg, out_dir: str | Path | None = None, **kw) -> Manifest:
    """prepare_dataset with the settings of a DataConfig (the `data:` config group)."""
    return prepare_dataset(
        out_dir or cfg.dataset_dir,
        list(cfg.inputs) or None,
        seq_len=cfg.seq_len,
        tokenizer=cfg.tokenizer or None,
        vocab_size=cfg.vocab_size,
        eos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
        tokenizer_train_bytes=cfg.tokenizer_train_bytes,
        text_field=cfg.text_field,
        val_fraction=cfg.val_fraction,
        shard_samples=cfg.shard_samples,
        workers=cfg.prepare_workers,
        **kw,
    )
