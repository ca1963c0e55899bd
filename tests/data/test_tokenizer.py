"""Byte-level BPE tokenizer: training, round trips, save/load, HF transformers equivalence."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer
from fastserve.errors import DataError

TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé, 中文, emoji 🎉 and\ttabs\n\n",
    "   leading spaces and trailing   ",
    "",
    "a",
]


def test_vocab_too_small():
    with pytest.raises(DataError, match="vocab_size 100 is too small"):
        Tokenizer.train(["abc"], vocab_size=100)
    tok = Tokenizer.train(["abc abc"], vocab_size=MIN_VOCAB_SIZE)
    assert tok.vocab_size == MIN_VOCAB_SIZE  # bytes + specials, no merges


def test_trained_layout(tokenizer):
    assert tokenizer.vocab_size == 512
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert tokenizer.id_to_token(1) == "<|eos|>"
    # merges learned: common code is shorter than its bytes
    text = "    def __init__(self):\n        return None\n"
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2


def test_round_trip_fixed_texts(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.encode(text, add_bos=True) == [0, *ids]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_round_trip_any_text(tokenizer, text):
    # byte-level BPE: every string encodes without unknown tokens and decodes back exactly
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    (as_text,) = tokenizer.encode_batch([text], split_special_tokens=True)
    assert tokenizer.decode(as_text) == text


def test_encode_batch_matches_encode(tokenizer):
    expected = [tokenizer.encode(t) for t in TEXTS]
    assert tokenizer.encode_batch(TEXTS) == expected
    assert tokenizer.encode_batch(TEXTS, parallel=False) == expected


def test_special_token_strings(tokenizer):
    text = "end<|eos|>next"
    assert tokenizer.eos_token_id in tokenizer.encode(text)  # as HF does by default
    (as_text,) = tokenizer.encode_batch([text], split_special_tokens=True)
    assert tokenizer.eos_token_id not in as_text
    assert tokenizer.decode(as_text) == text


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    files = {p.name for p in (tmp_path / "tok").iterdir()}
    assert files == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|eos|>" and "chat_template" in config

    for source in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):  # dir, or bare file
        loaded = Tokenizer.load(source)
        assert loaded.fingerprint == tokenizer.fingerprint
        assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
            "<|bos|>",
            "<|eos|>",
            "<|pad|>",
        )
        assert [loaded.encode(t) for t in TEXTS] == [tokenizer.encode(t) for t in TEXTS]


def test_fingerprint_tells_tokenizers_apart(small_corpus, tokenizer):
    other = Tokenizer.train(small_corpus.train, vocab_size=300)
    assert other.fingerprint != tokenizer.fingerprint
    again = Tokenizer.train(small_corpus.train, vocab_size=512)
    assert again.fingerprint == tokenizer.fingerprint  # training is deterministic


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(DataError, match="sentencepiece"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_hf_style_config_is_honoured(tokenizer, tmp_path):
    # An HF model dir spells special tokens as {"content": ...} and may have no pad token.
    tokenizer.save_pretrained(tmp_path)
    config = {"bos_token": {"content": "<|pad|>"}, "eos_token": "<|bos|>", "pad_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (2, 0, None)


@pytest.mark.slow
def test_transformers_autotokenizer_agrees(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tokenizer.vocab_size
    for text in [*TEXTS, "x<|eos|>y <|bos|>"]:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    for gen in (False, True):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=gen) == text
        ours = tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        theirs = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        theirs = (
            theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        )
        assert ours == list(theirs)
    assert text.endswith("<|bos|>assistant\n") and text.count("<|eos|>") == 3

    # and a dir saved by transformers loads back here with the same ids and template
    hf.save_pretrained(tmp_path / "hf")
    back = Tokenizer.load(tmp_path / "hf")
    assert back.eos_token_id == 1 and back.chat_template == tokenizer.chat_template
    assert [back.encode(t) for t in TEXTS] == [tokenizer.encode(t) for t in TEXTS]
