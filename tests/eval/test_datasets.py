"""Evaluation data: text files, directories and shard dirs -> one token stream, its bytes and
hash (fastserve.eval.datasets)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fastserve.data.tokenizer import Tokenizer
from fastserve.errors import DataError
from fastserve.eval.datasets import load_data, start_token_id
from tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_start_token_is_eos_unless_the_tokenizer_adds_bos(tokenizer):
    from tokenizers import processors

    assert start_token_id(tokenizer) == tokenizer.eos_token_id  # FastServe: documents follow eos
    backend = type(tokenizer.backend).from_str(tokenizer.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)]
    )
    llama_like = Tokenizer(backend, "<|bos|>", "<|eos|>", "<|pad|>")
    assert start_token_id(llama_like) == tokenizer.bos_token_id


def test_text_file(tokenizer, tmp_path):
    text = "the cat sat on a mat <|eos|> ünïcode\n"
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    data = load_data(str(path), tokenizer)
    expected = [tokenizer.eos_token_id, *tokenizer.encode_batch([text], True)[0]]
    assert data.tokens.tolist() == expected and data.tokens.dtype == np.int64
    assert data.num_scored == len(expected) - 1
    assert data.num_bytes == len(text.encode("utf-8")) and data.bytes_source == "text"
    assert data.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # = sha256sum a.txt
    assert (data.kind, data.num_documents, data.truncated) == ("text", 1, False)


def test_directory_joins_documents_with_eos(tokenizer, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("queue blocks", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("the cat", encoding="utf-8")
    (tmp_path / ".hidden").write_text("not read", encoding="utf-8")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    data = load_data(str(tmp_path), tokenizer)
    eos = tokenizer.eos_token_id
    assert data.tokens.tolist() == [
        eos,
        *tokenizer.encode("queue blocks"),
        eos,
        *tokenizer.encode("the cat"),
    ]
    assert data.num_documents == 2 and data.files_skipped == 1
    assert data.num_bytes == len("queue blocksthe cat")
    lines = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {name}\n"
        for p, name in ((tmp_path / "b.txt", "b.txt"), (tmp_path / "sub" / "a.txt", "sub/a.txt"))
    )
    assert data.sha256 == hashlib.sha256(lines.encode()).hexdigest()


def test_shard_dir_val_split(tmp_path):
    from fastserve.data import TokenShards, prepare_data

    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"document {i} " * 50, encoding="utf-8")
    out = tmp_path / "shards"
    prepare_data([str(tmp_path / "corpus")], out, vocab_size=280, split="tail", progress=False)
    tokenizer = Tokenizer.load(out)
    shards = TokenShards(out, "val")
    data = load_data(str(out), tokenizer)
    assert data.kind == "shards" and data.bytes_source == "shard_meta"
    assert data.tokens.tolist() == [tokenizer.eos_token_id, *np.concatenate(shards.arrays)]
    assert data.num_bytes == shards.num_bytes
    assert data.num_bytes == len(tokenizer.decode(data.tokens[1:].tolist()).encode("utf-8"))
    expected = hashlib.sha256(
        b"".join((out / f).read_bytes() for f in shards.meta.splits["val"].files)
    )
    assert data.sha256 == expected.hexdigest()
    with pytest.raises(DataError, match="different tokenizer"):
        load_data(str(out), tiny_tokenizer())


def test_limit_cuts_the_stream_and_counts_decoded_bytes(tokenizer, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("the cat sat on a mat while server tokens queue " * 5, encoding="utf-8")
    full = load_data(str(path), tokenizer)
    cut = load_data(str(path), tokenizer, limit=7)
    assert cut.truncated and cut.num_scored == 7 and cut.bytes_source == "decoded"
    assert cut.tokens.tolist() == full.tokens[:8].tolist()
    assert cut.num_bytes == len(tokenizer.decode(full.tokens[1:8].tolist()).encode("utf-8"))
    assert load_data(str(path), tokenizer, limit=10**6).truncated is False


def test_bad_sources(tokenizer, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(str(tmp_path / "missing.txt"), tokenizer)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_data(str(tmp_path / "empty.txt"), tokenizer)
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="no text files"):
        load_data(str(tmp_path / "dir"), tokenizer)
    (tmp_path / "bin").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="binary"):
        load_data(str(tmp_path / "bin"), tokenizer)
