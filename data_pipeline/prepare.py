"""`mor data prepare`: raw text -> tokenizer -> packed samples in WebDataset shards + manifest.

Stages, each restartable:
1. tokenizer: the given tokenizer.json, or a byte-level BPE trained on the inputs (saved first, reused
   on a rerun);
2. tokenize: input files -- large .jsonl and parquet files in parts (corpus.plan_parts) -- in
   parallel, one task per part, into id caches under .prepare/tok/ (EOS after every document); a part
   whose cache exists is not tokenized again;
3. pack: the caches in sorted file and part order form one token stream, cut into samples of
   seq_len + 1 ids that start every seq_len ids (consecutive samples share one token, so every token
   in the stream is a prediction target exactly once). An evenly spread val_fraction of samples goes
   to the val split. Every shard's samples follow from the stream's length alone, so shards are
   written in parallel, one task each. Shards go to a temp name and are renamed when whole; finished
   shards are journalled in .prepare/done/ and not written again on a rerun.
4. manifest.json is written last; then .prepare/ is removed.
The output depends only on the file order, never on the number of workers (byte for byte).
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
import sys
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mor_dist.data_pipeline import remote
from mor_dist.data_pipeline import tokenizer as toklib
from mor_dist.data_pipeline.corpus import (PIECE_CHARS, default_corpus_files, iter_pieces, iter_texts, plan_parts,
                                           resolve_inputs)
from mor_dist.data_pipeline.errors import DataError
from mor_dist.data_pipeline.manifest import FORMAT, MANIFEST, TOKENIZER, Manifest, load_manifest, write_json_atomic
from mor_dist.data_pipeline.shards import FIELD, KEY_DIGITS, Layout, ShardWriter

log = logging.getLogger("mor_dist.data")

WORK = ".prepare"
DEFAULT_VOCAB = 4096  # a trained tokenizer's size when neither the flags nor a model say otherwise
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
    """One input file or part of one -> its id cache (uint16/uint32 raw) + a stats sidecar, both
    atomically."""
    src, dst, text_field, eos_id, dtype, part, nbytes, piece_chars = task
    cpu0 = time.process_time()
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

        for text, ends in iter_pieces(src, text_field, piece_chars, part):
            batch.append((text, ends))
            chars += len(text)
            if chars >= _ENCODE_BATCH_CHARS:
                flush()
                chars = 0
        flush()
    stats = {"source": src, "part": part, "bytes": nbytes, "documents": docs, "tokens": tokens}
    write_json_atomic(Path(dst + ".json"), stats)
    os.replace(tmp, dst)
    return dict(stats, cpu_s=time.process_time() - cpu0, pid=os.getpid())


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


def _pool(workers: int, initializer, initargs):
    # Each pool process works on one task at a time on one thread; without this the Rust side of the
    # tokenizer would also spread every batch over all cores (and warn about the fork).
    with _env("TOKENIZERS_PARALLELISM", "false"):
        return mp.get_context("fork").Pool(workers, initializer, initargs)


def _charge(profile: dict | None, phase: str, result: dict) -> None:
    """Adds a task's CPU seconds to the profile: per phase and worker process, and per task."""
    if profile is not None:
        per_pid = profile.setdefault("phases", {}).setdefault(phase, {})
        per_pid[result["pid"]] = per_pid.get(result["pid"], 0.0) + result["cpu_s"]
        profile.setdefault("tasks", {}).setdefault(phase, []).append(result["cpu_s"])


def _tokenize_all(files, tok_dir: Path, tok_path: Path, text_field, eos_id, dtype, workers, progress,
                  piece_chars, profile) -> tuple[list[Path], list[dict]]:
    """Caches and stats of every part of every file, in stream order."""
    tok_dir.mkdir(parents=True, exist_ok=True)
    itemsize = np.dtype(dtype).itemsize
    tasks, caches = [], []
    for i, f in enumerate(files):
        for j, (part, nbytes) in enumerate(plan_parts(f)):
            dst = tok_dir / f"{i:08d}-{j:05d}.bin"
            caches.append(dst)
            tasks.append((str(f), str(dst), text_field, eos_id, dtype, part, nbytes, piece_chars))
    stats: list[dict | None] = [_cached_stats(d, itemsize) for d in caches]
    todo = [i for i, s in enumerate(stats) if s is None]
    todo.sort(key=lambda i: -tasks[i][6])  # biggest first balances the pool
    total = sum(t[6] for t in tasks)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
    bar.update(total - sum(tasks[i][6] for i in todo))
    if len(tasks) > len(todo):
        log.info("tokenize: %d of %d parts already done by an earlier run", len(tasks) - len(todo), len(tasks))
    try:
        if workers <= 1 or len(todo) <= 1:
            _init_worker(str(tok_path))
            with _env("TOKENIZERS_PARALLELISM", "false"):  # one worker is one core, as in the pool
                for i in todo:
                    stats[i] = _tokenize_file(tasks[i])
                    _charge(profile, "tokenize", stats[i])
                    bar.update(tasks[i][6])
        else:
            with _pool(min(workers, len(todo)), _init_worker, (str(tok_path),)) as pool:
                for i, st in pool.imap_unordered(_indexed_tokenize, [(i, tasks[i]) for i in todo]):
                    stats[i] = st
                    _charge(profile, "tokenize", st)
                    bar.update(tasks[i][6])
    finally:
        bar.close()
    return caches, stats


def _indexed_tokenize(item):
    i, task = item
    return i, _tokenize_file(task)


# ---- pack ----


def val_rule(val_fraction: float):
    """is_val(k): whether sample k of the packed stream is held out. Exactly floor(n * val_fraction)
    of the first n samples are, evenly spread; exact rational arithmetic, so 0.02 means every 50th."""
    num, den = _fraction(val_fraction)
    return lambda k: (k + 1) * num // den > k * num // den


def _fraction(val_fraction: float) -> tuple[int, int]:
    f = Fraction(val_fraction).limit_denominator(1 << 30)
    return f.numerator, f.denominator


def _sample_ids(split: str, lo: int, hi: int, num: int, den: int) -> np.ndarray:
    """Stream sample numbers k of the split's samples lo..hi-1 (train: the k not held out; val: the
    k held out, per val_rule)."""
    if split == "val":  # the i-th held-out k: smallest m with floor(m * f) > i, minus one
        i = np.arange(lo, hi, dtype=np.int64)
        return -((-(i + 1) * den) // num) - 1

    def first_with(i):  # smallest m with m - floor(m * f) > i
        a, b = i + 1, (i + 1) * den // max(den - num, 1) + 2
        while a < b:
            m = (a + b) // 2
            if m - m * num // den > i:
                b = m
            else:
                a = m + 1
        return a - 1

    ks = np.arange(first_with(lo), first_with(hi - 1) + 1, dtype=np.int64)
    return ks[(ks + 1) * num // den == ks * num // den]


_pack_ctx: dict = {}


def _init_pack(ctx: dict) -> None:
    _pack_ctx.clear()
    _pack_ctx.update(ctx)


def _stream_tokens(lo: int, hi: int) -> np.ndarray:
    """Ids [lo, hi) of the token stream (the caches end to end)."""
    c = _pack_ctx
    starts, caches, dtype = c["starts"], c["caches"], c["layout"].dtype
    itemsize = np.dtype(dtype).itemsize
    out = []
    i = int(np.searchsorted(starts, lo, side="right")) - 1
    while lo < hi:
        end = starts[i + 1]
        if end > lo:
            n = min(hi, end) - lo
            out.append(np.fromfile(caches[i], dtype=dtype, count=n, offset=(lo - starts[i]) * itemsize))
            lo += n
        i += 1
    return np.concatenate(out) if len(out) != 1 else out[0]


def _write_shard(task: tuple) -> dict:
    """One shard: the split's samples lo..hi-1 cut from the stream, written and journalled."""
    split, index, lo, hi = task
    cpu0 = time.process_time()
    c = _pack_ctx
    seq_len, layout = c["seq_len"], c["layout"]
    ks = _sample_ids(split, lo, hi, c["num"], c["den"])
    first = int(ks[0]) * seq_len
    tokens = _stream_tokens(first, int(ks[-1]) * seq_len + seq_len + 1)
    name = f"{split}-{index:06d}.tar"
    writer = ShardWriter(c["out"] / name, layout, first_key=lo)
    try:
        for k in ks:
            at = int(k) * seq_len - first
            writer.add(tokens[at : at + seq_len + 1])
        entry = writer.close()
    except BaseException:
        writer.abort()
        raise
    write_json_atomic(c["journal"] / f"{name}.json", entry)
    return {"shard": (split, index), "entry": entry, "cpu_s": time.process_time() - cpu0, "pid": os.getpid()}


def _journalled(out: Path, journal: Path, name: str, first_key: int, samples: int) -> dict | None:
    """The entry of a shard an earlier run finished (journalled, and the file has its size)."""
    jfile = journal / f"{name}.json"
    if not jfile.is_file():
        return None
    entry = json.loads(jfile.read_text())
    f = out / name
    if not (f.is_file() and f.stat().st_size == entry["bytes"] and entry["first_key"] == first_key):
        return None
    if entry["samples"] != samples:
        raise DataError(f, "journal of the earlier run does not match; rerun with --overwrite")
    return entry


def _pack(caches: list[Path], tokens: list[int], out: Path, layout: Layout, seq_len: int, val_fraction: float,
          shard_samples: int, journal: Path, workers: int, progress: bool, profile) -> tuple[dict, int]:
    journal.mkdir(parents=True, exist_ok=True)
    total = sum(tokens)
    n = (total - 1) // seq_len if total > seq_len else 0
    num, den = _fraction(val_fraction)
    counts = {"val": n * num // den}
    counts["train"] = n - counts["val"]
    entries: dict[tuple[str, int], dict] = {}
    todo = []
    for split in ("train", "val"):
        for index, lo in enumerate(range(0, counts[split], shard_samples)):
            hi = min(lo + shard_samples, counts[split])
            done = _journalled(out, journal, f"{split}-{index:06d}.tar", lo, hi - lo)
            if done is not None:
                entries[(split, index)] = done
            else:
                todo.append((split, index, lo, hi))
    if entries:
        log.info("pack: %d finished shards of an earlier run kept as they are", len(entries))
    ctx = {"out": out, "journal": journal, "layout": layout, "seq_len": seq_len, "num": num, "den": den,
           "caches": [str(c) for c in caches], "starts": np.concatenate([[0], np.cumsum(tokens, dtype=np.int64)])}
    bar = tqdm(total=len(todo), unit="shard", desc="pack", disable=not progress)

    def collect(results):
        for r in results:
            entries[r["shard"]] = r["entry"]
            _charge(profile, "pack", r)
            bar.update()

    try:
        if workers <= 1 or len(todo) <= 1:
            _init_pack(ctx)
            collect(_write_shard(t) for t in todo)
        else:
            with _pool(min(workers, len(todo)), _init_pack, (ctx,)) as pool:
                collect(pool.imap_unordered(_write_shard, todo))
    finally:
        bar.close()
    splits = {}
    for split in ("train", "val"):
        shards = [entries[(split, i)] for i in range(-(-counts[split] // shard_samples))]
        splits[split] = {"samples": counts[split], "tokens": counts[split] * layout.sample_tokens, "shards": shards}
    # Tokens after the last full sample are not in any sample (the last sample's final token is).
    tail = total - n * seq_len - 1 if n else total
    return splits, tail


# ---- driver ----


def prepare_dataset(
    out_dir: str | Path,
    inputs: list[str] | None = None,
    *,
    seq_len: int = 2048,
    tokenizer: str | Path | None = None,
    vocab_size: int = DEFAULT_VOCAB,
    eos_token: str = toklib.DEFAULT_EOS,
    pad_token: str = toklib.DEFAULT_PAD,
    tokenizer_train_bytes: int = 1 << 30,
    text_field: str = "text",
    val_fraction: float = 0.005,
    shard_samples: int = 4096,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    profile: dict | None = None,
) -> Manifest:
    """Builds (or finishes, or confirms) a prepared dataset in out_dir; returns its manifest.

    inputs: files/directories/globs; None or empty = the default corpus (standard-library sources).
    tokenizer: an existing tokenizer.json; None = train a byte-level BPE of vocab_size on the inputs.
    Rerunning after an interruption continues where it stopped; rerunning a finished preparation
    with the same settings returns at once; different settings need overwrite=True.
    profile: a dict to fill with CPU seconds per phase and worker process and per task (in the order
    they finished), the parent's CPU seconds and the wall time (bench/data_throughput.py).
    """
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if seq_len < 1 or shard_samples < 1 or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"need seq_len >= 1, shard_samples >= 1, 0 <= val_fraction < 1 "
                         f"(got {seq_len}, {shard_samples}, {val_fraction})")
    if remote.scheme(str(out_dir)) not in ("", "file"):
        raise DataError(out_dir, "prepare writes a local directory; give a path, then copy the finished dataset "
                                 "(manifest.json, tokenizer.json, *.tar) to where it will be read from")
    out = (remote.local_path(str(out_dir)) or Path(out_dir)).expanduser().resolve()
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
    if out.exists() and not out.is_dir():
        raise DataError(out, "is a file, not a folder; give data.dataset_dir (or -o) a folder for the shards")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(out, f"cannot be created ({e.strerror or e}); give data.dataset_dir (or -o) a folder "
                        "you can write to") from None
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

        # Cutting text files into pieces keeps their ids only for byte-level tokenizers.
        piece_chars = PIECE_CHARS if toklib.splits_safely(tok) else sys.maxsize
        workers = workers or _cpu_count()
        caches, stats = _tokenize_all(files, work / "tok", tok_path, text_field, eos_id, dtype, workers, progress,
                                      piece_chars, profile)
        total = sum(s["tokens"] for s in stats)
        splits, tail = _pack(caches, [s["tokens"] for s in stats], out, layout, seq_len, val_fraction, shard_samples,
                             work / "done", workers, progress, profile)
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
    if profile is not None:
        profile.update(wall_s=time.perf_counter() - wall0, parent_cpu_s=time.process_time() - cpu0)
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
    """prepare_dataset with the settings of a DataConfig (the `data:` config group); a whole config
    (MoRConfig) trains the tokenizer at model.vocab_size."""
    vocab = getattr(getattr(cfg, "model", None), "vocab_size", None)
    cfg = getattr(cfg, "data", cfg)
    return prepare_dataset(
        out_dir or cfg.dataset_dir,
        list(cfg.inputs) or None,
        seq_len=cfg.seq_len,
        tokenizer=cfg.tokenizer or None,
        vocab_size=cfg.vocab_size or vocab or DEFAULT_VOCAB,
        eos_token=cfg.eos_token,
        pad_token=cfg.pad_token,
        tokenizer_train_bytes=cfg.tokenizer_train_bytes,
        text_field=cfg.text_field,
        val_fraction=cfg.val_fraction,
        shard_samples=cfg.shard_samples,
        workers=cfg.prepare_workers,
        **kw,
    )
