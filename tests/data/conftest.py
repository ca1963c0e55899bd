"""Shared fixtures for the data tests: a small real corpus (stdlib text) and a tokenizer on it."""

from __future__ import annotations

import pytest

from fastserve.data.corpus import load_corpus
from fastserve.data.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def small_corpus():
    """About 150 KB of the standard library: real text, fast to tokenize."""
    return load_corpus(["builtin:stdlib"], max_bytes=150_000, seed=0)


@pytest.fixture(scope="session")
def tokenizer(small_corpus):
    return Tokenizer.train(small_corpus.train, vocab_size=512)


def _write(path, data: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.fixture
def write():
    """write(path, str | bytes) -> path, creating parent directories."""
    return _write
