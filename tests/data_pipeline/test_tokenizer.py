from __future__ import annotations

import json

import pytest

from mor_dist.data_pipeline import tokenizer as toklib
from mor_dist.data_pipeline.errors import DataError


def test_byte_level_roundtrip_and_specials(tokenizer_file, text_files):
    tok = toklib.load_tokenizer(tokenizer_file)
    assert tok.get_vocab_size() <= 512
    assert tok.token_to_id(toklib.DEFAULT_EOS) == 0 and tok.token_to_id(toklib.DEFAULT_PAD) == 1
    text = text_files[0].read_text(encoding="utf-8")[:5000] + " naïve — 日本語 \U0001f600\t\r\n"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text  # nothing is out of vocabulary at byte level
    assert len(ids) < len(text.encode()) / 1.5  # merges were learned from the real text


def test_fingerprint_ignores_formatting_not_content(tokenizer_file, tmp_path):
    text = tokenizer_file.read_text()
    fp = toklib.file_fingerprint(tokenizer_file)
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(text), indent=4))
    assert toklib.file_fingerprint(pretty) == fp
    obj = json.loads(text)
    obj["model"]["merges"] = obj["model"]["merges"][:-1]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(obj))
    assert toklib.file_fingerprint(other) != fp


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing"):
        toklib.load_tokenizer(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        toklib.file_fingerprint(bad)
    tok = toklib.train_tokenizer(["abc abc abd"] * 10, 260, eos_token="<eos>", pad_token="<pad>")
    with pytest.raises(DataError, match=r"x\.json: tokenizer has no '<\|endoftext\|>' token"):
        toklib.special_id(tok, "<|endoftext|>", "x.json")


def test_dtype_fits_vocab():
    assert toklib.token_dtype(65536) == "<u2" and toklib.token_dtype(65537) == "<u4"


def test_trained_vocabulary_is_exactly_the_size_asked(text_files):
    """Too little text for the merges asked: reserved tokens fill up to vocab_size, never produced."""
    text = text_files[0].read_text(encoding="utf-8")[:3000]
    tok = toklib.train_tokenizer([text], 2000)
    assert tok.get_vocab_size() == 2000 and tok.token_to_id("<|reserved_0|>") is not None
    reserved = {tok.token_to_id(t) for t in tok.get_vocab() if t.startswith("<|reserved_")}
    assert not reserved & set(tok.encode(text).ids)
    big = toklib.train_tokenizer([t.read_text(encoding="utf-8") for t in text_files], 300)
    assert big.get_vocab_size() == 300 and big.token_to_id("<|reserved_0|>") is None


def test_which_tokenizers_may_tokenize_text_in_pieces(tokenizer_file):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    assert toklib.splits_safely(toklib.load_tokenizer(tokenizer_file))
    sp = Tokenizer(models.BPE())  # SentencePiece-style (Llama 2): a cut would add a "▁" at the piece start
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not toklib.splits_safely(sp)
    gpt = Tokenizer(models.BPE())
    gpt.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    gpt.normalizer = normalizers.NFC()
    assert toklib.splits_safely(gpt)
    gpt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not toklib.splits_safely(gpt)
