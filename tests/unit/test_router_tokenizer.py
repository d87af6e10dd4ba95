"""Tokenizers: the built-in one is deterministic; the HF one loads a local tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from router_service.tokenizer import Tokenizer, load_tokenizer


def test_simple_tokenizer_is_deterministic_and_prefix_stable() -> None:
    tok = load_tokenizer("simple")
    assert isinstance(tok, Tokenizer)
    a = tok.encode("You are a helpful assistant. What is 2+2?")
    b = tok.encode("You are a helpful assistant. Tell me a joke")
    assert a == load_tokenizer("simple").encode("You are a helpful assistant. What is 2+2?")
    assert a[:6] == b[:6] and all(0 <= t < tok.vocab_size for t in a)


def test_hf_tokenizer_from_local_file(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    t.save(str(path))
    tok = load_tokenizer("hf", str(path))
    assert tok.encode("hello world zzz") == [1, 2, 0]
    assert tok.vocab_size == 3
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer("hf", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer("bpe")
