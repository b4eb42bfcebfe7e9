"""`mor data ...`: prepare a dataset, train a tokenizer, verify shards.

Settings come from the `data:` group of --config (or DataConfig defaults), then from the flags. The
numeric flags are checked against the ranges of the data keys they set. Errors (DataError, and
ConfigError for flags) reach `mor`'s main, which prints them as one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mor_dist.config import RANGES, ConfigError, flag_type


def _data_config(args):
    """(the data: group, model.vocab_size or None without --config)."""
    if args.config:
        from mor_dist.config import load_config

        cfg = load_config(args.config, args.overrides)
        return cfg.data, cfg.model.vocab_size
    if args.overrides:
        raise ConfigError(f"{args.overrides[0]}: a key=value override (or --set) applies to a config; add "
                          "--config CONFIG")
    from mor_dist.data_pipeline.config import DataConfig

    return DataConfig(), None


def _vocab_size(args, cfg, model_vocab: int | None) -> int:
    """The size of a tokenizer to train: the model's when there is a --config (any other is refused,
    since training refuses a dataset whose tokenizer differs from the model's vocabulary)."""
    from mor_dist.data_pipeline.prepare import DEFAULT_VOCAB

    chosen, key = (args.vocab_size, "--vocab-size") if args.vocab_size is not None else (cfg.vocab_size, "data.vocab_size")
    if model_vocab is None:
        return chosen or DEFAULT_VOCAB
    if chosen is not None and chosen != model_vocab:
        raise ConfigError(f"{key}: {chosen} differs from model.vocab_size={model_vocab} of {args.config}; the "
                          "tokenizer must have the model's vocabulary: leave it unset (the model's is used) or "
                          "change model.vocab_size")
    return model_vocab


def _check_given_tokenizer(path, model_vocab: int | None, config) -> None:
    """An existing tokenizer.json is used as is: with --config its vocabulary must be the model's."""
    if path and model_vocab is not None:
        from mor_dist.data_pipeline import tokenizer as toklib

        size = toklib.load_tokenizer(path).get_vocab_size()
        if size != model_vocab:
            raise ConfigError(f"{path}: the tokenizer has {size} tokens, model.vocab_size of {config} is {model_vocab}; "
                              f"set model.vocab_size={size}, or use a tokenizer of {model_vocab} tokens")


def _pick(flag, default):
    return default if flag is None else flag


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _prepare(args) -> int:
    from mor_dist.data_pipeline.prepare import prepare_dataset

    _setup_logging()
    cfg, model_vocab = _data_config(args)
    if args.default_corpus and args.inputs:
        raise ConfigError("--default-corpus: cannot be combined with input paths; give one or the other")
    inputs = None if args.default_corpus else (args.inputs or list(cfg.inputs) or None)
    tokenizer = _pick(args.tokenizer, cfg.tokenizer) or None
    _check_given_tokenizer(tokenizer, model_vocab, args.config)
    m = prepare_dataset(
        _pick(args.out, cfg.dataset_dir),
        inputs,
        seq_len=_pick(args.seq_len, cfg.seq_len),
        tokenizer=tokenizer,
        vocab_size=_vocab_size(args, cfg, model_vocab),
        eos_token=_pick(args.eos_token, cfg.eos_token),
        pad_token=cfg.pad_token,
        tokenizer_train_bytes=_pick(args.tokenizer_train_bytes, cfg.tokenizer_train_bytes),
        text_field=_pick(args.text_field, cfg.text_field),
        val_fraction=_pick(args.val_fraction, cfg.val_fraction),
        shard_samples=_pick(args.shard_samples, cfg.shard_samples),
        workers=_pick(args.workers, cfg.prepare_workers),
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    summary = {s: {k: v for k, v in d.items() if k != "shards"} | {"shards": len(d["shards"])}
               for s, d in m.data["splits"].items()}
    print(json.dumps({"dataset": str(m.dir), "splits": summary, "corpus": m.data["corpus"]}, indent=1))
    return 0


def _tokenizer(args) -> int:
    from mor_dist.data_pipeline import tokenizer as toklib
    from mor_dist.data_pipeline.corpus import default_corpus_files, iter_texts, resolve_inputs
    from mor_dist.data_pipeline.prepare import _spread

    from pathlib import Path

    from mor_dist.data_pipeline.errors import DataError

    _setup_logging()
    if Path(args.out).is_dir():  # refused before the training, not after it
        raise DataError(args.out, "is a folder; give the tokenizer a file name (e.g. tokenizer.json)")
    cfg, model_vocab = _data_config(args)
    inputs = args.inputs or list(cfg.inputs)
    files = resolve_inputs(inputs) if inputs else default_corpus_files()
    vocab = _vocab_size(args, cfg, model_vocab)
    logging.getLogger("mor_dist.data").info("training a %d-entry byte-level BPE on %d files", vocab, len(files))
    texts = iter_texts(_spread(files), _pick(args.text_field, cfg.text_field),
                       _pick(args.tokenizer_train_bytes, cfg.tokenizer_train_bytes))
    tok = toklib.train_tokenizer(texts, vocab, cfg.eos_token, cfg.pad_token)
    fp = toklib.save_tokenizer(tok, args.out)
    print(json.dumps({"tokenizer": args.out, "vocab_size": tok.get_vocab_size(), "fingerprint": fp}, indent=1))
    return 0


def _verify(args) -> int:
    from mor_dist.data_pipeline.verify import verify_dataset

    _setup_logging()
    from mor_dist.data_pipeline.remote import FetchPolicy

    cfg, _ = _data_config(args)
    problems = verify_dataset(_pick(args.dataset, cfg.dataset_dir), read_samples=args.read_samples,
                              fetch=FetchPolicy(cfg.fetch_retries, cfg.fetch_backoff_s))
    for p in problems:
        print(p, file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def _common(p: argparse.ArgumentParser) -> None:
    """--config, and its overrides: a positional KEY=VALUE among the inputs (`mor` moves them to
    args.overrides), or --set KEY=VALUE."""
    p.add_argument("--config", help="YAML config whose data: group supplies the defaults")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (with --config), the same as a positional KEY=VALUE, e.g. "
                   "data.seq_len=512; repeatable")


def _key_flag(key: str, kind=int):
    """The flag that sets data.<key>: same range as the key."""
    return flag_type(RANGES[f"data.{key}"], kind)


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `data` with sub-commands prepare, tokenizer and verify on an argparse subparsers."""
    data = subparsers.add_parser("data", help="prepare datasets: tokenizer, WebDataset shards, manifest")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("prepare", help="raw text -> packed token shards + manifest (restartable)",
                       description="Tokenize raw text (.txt/.md/.rst/.py files, JSON lines .jsonl[.gz|.zst] "
                                   "and .json.gz/.json.zst, .parquet, Hugging Face save_to_disk folders; files, "
                                   "directories or globs) into packed WebDataset shards. Without inputs, "
                                   "uses the default corpus (this Python's standard-library sources). "
                                   "With --config the tokenizer is trained at model.vocab_size. "
                                   "Rerun after an interruption to continue.")
    p.add_argument("inputs", nargs="*", help="files, directories or globs (default: data.inputs, else the default "
                   "corpus); KEY=VALUE items are config overrides")
    p.add_argument("--default-corpus", action="store_true", help="use the standard-library sources")
    p.add_argument("-o", "--out", help="dataset directory (default: data.dataset_dir)")
    p.add_argument("--seq-len", type=_key_flag("seq_len"),
                   help="tokens per training sequence (samples hold seq_len + 1)")
    p.add_argument("--tokenizer", help="existing tokenizer.json, used as is (default: train a byte-level BPE on "
                                       "the inputs)")
    p.add_argument("--eos-token", help="the tokenizer's document separator (default: data.eos_token, <|endoftext|>)")
    p.add_argument("--vocab-size", type=_key_flag("vocab_size"),
                   help="vocabulary of a trained tokenizer (with --config: model.vocab_size)")
    p.add_argument("--tokenizer-train-bytes", type=_key_flag("tokenizer_train_bytes"),
                   help="cap on the text the tokenizer is trained on")
    p.add_argument("--text-field", help="JSON field / parquet or arrow column with the text")
    p.add_argument("--val-fraction", type=_key_flag("val_fraction", float),
                   help="share of samples held out for validation")
    p.add_argument("--shard-samples", type=_key_flag("shard_samples"), help="samples per shard")
    p.add_argument("--workers", type=_key_flag("prepare_workers"),
                   help="tokenize and pack processes (0 = all cores); the output does not depend on it")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier preparation in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer and save tokenizer.json")
    p.add_argument("inputs", nargs="*", help="files, directories or globs (default: data.inputs, else the default "
                   "corpus); KEY=VALUE items are config overrides")
    p.add_argument("-o", "--out", required=True, help="where to write tokenizer.json")
    p.add_argument("--vocab-size", type=_key_flag("vocab_size"), help="vocabulary (with --config: model.vocab_size)")
    p.add_argument("--tokenizer-train-bytes", type=_key_flag("tokenizer_train_bytes"),
                   help="cap on the text trained on")
    p.add_argument("--text-field", help="JSON field / parquet or arrow column with the text")
    _common(p)
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("verify", help="check every shard of a prepared dataset against its manifest (sha256)")
    p.add_argument("dataset", nargs="?", help="dataset directory or URL (default: data.dataset_dir)")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (with --config)")
    p.add_argument("--read-samples", action="store_true", help="also read and check every sample")
    _common(p)
    p.set_defaults(func=_verify)
    return data


def main(argv: list[str] | None = None) -> int:
    """`mor data ...` with argv starting at "data": `mor`'s own main, for its error handling."""
    from mor_dist.cli import main as mor_main

    return mor_main(argv)


if __name__ == "__main__":
    sys.exit(main())
