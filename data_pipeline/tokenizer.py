"""Byte-level BPE tokenizer (HF `tokenizers`): train, load, save, fingerprint.

Byte level means every UTF-8 byte is in the base alphabet, so no text is ever out of vocabulary and
decode(encode(text)) == text.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mor_dist.data_pipeline.errors import DataError

DEFAULT_EOS = "<|endoftext|>"
DEFAULT_PAD = "<|pad|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, eos_token: str = DEFAULT_EOS, pad_token: str = DEFAULT_PAD
) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` entries (256 bytes + merges + the two special tokens).
    When the text holds too few repeated pairs for that many merges, the rest are reserved special
    tokens (`<|reserved_0|>`, ...) that never occur in encoded text, so that the vocabulary is the
    model's size all the same."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 256 bytes + 2 special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[eos_token, pad_token],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    short = vocab_size - tok.get_vocab_size()
    if short > 0:
        import logging

        logging.getLogger("mor_dist.data").warning(
            "the tokenizer text supports only %d of %d entries; the last %d are reserved tokens (more text "
            "gives more merges)", vocab_size - short, vocab_size, short)
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(short)])
    return tok


def splits_safely(tok: Tokenizer) -> bool:
    """Whether cutting a text at a newline between two non-space characters leaves its ids as they are:
    true for a byte-level pre-tokenizer without a prefix space and no normalizer that adds text (what
    train_tokenizer makes, and GPT-2/SmolLM-style tokenizers); false for e.g. SentencePiece-style
    (Metaspace) ones, whose text files are then tokenized whole."""
    obj = json.loads(tok.to_str())
    pre = obj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    norm = obj.get("normalizer") or {}
    norms = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else ([norm] if norm else [])
    harmless = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents"}
    return (bool(byte_level) and not any(p.get("add_prefix_space") for p in byte_level)
            and all(n.get("type") in harmless for n in norms))


def tokenizer_json(tok: Tokenizer) -> str:
    return tok.to_str()


def fingerprint(tokenizer_json_text: str) -> str:
    """sha256 of the tokenizer's JSON in canonical form (sorted keys, no whitespace): it covers the
    vocabulary, merges, special tokens and pre-tokenizer, and ignores how the file is formatted."""
    try:
        obj = json.loads(tokenizer_json_text)
    except json.JSONDecodeError as e:
        raise DataError("tokenizer.json", f"not valid JSON: {e}") from None
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "tokenizer file is missing; give the path of a tokenizers JSON file (`mor data "
                              "tokenizer` makes one)")
    return path


def file_fingerprint(path: str | Path) -> str:
    path = _existing(path)
    try:
        return fingerprint(path.read_text(encoding="utf-8"))
    except DataError as e:
        raise DataError(path, e.problem) from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = _existing(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
        raise DataError(path, f"not a tokenizers JSON file: {str(e).splitlines()[0] if str(e) else e}; give the "
                              "tokenizer.json a Hugging Face tokenizers library saved (`mor data tokenizer` makes one)") from None


def save_tokenizer(tok: Tokenizer, path: str | Path) -> str:
    """Writes atomically (temp name + rename) and returns the fingerprint of what was written."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a folder; give the tokenizer a file name (e.g. tokenizer.json)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(path.parent, f"cannot be created ({e.strerror or e}); give a folder you can write to") from None
    text = tokenizer_json(tok)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return fingerprint(text)


def special_id(tok: Tokenizer, token: str, source: str | Path) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise DataError(source, f"tokenizer has no {token!r} token (needed to separate documents); give a tokenizer "
                                "that has it, or name the one it has with data.eos_token")
    return tid


def token_dtype(vocab_size: int) -> str:
    """Smallest little-endian unsigned type that holds every id."""
    return "<u2" if vocab_size <= 1 << 16 else "<u4"
