"""Corpus reading, cleaning, dedupe and splitting (fastserve.data.corpus)."""

from __future__ import annotations

import json
import sys
import sysconfig
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve.data.corpus import (
    clean_text,
    iter_documents,
    load_corpus,
    split_documents,
    split_tail,
    stdlib_files,
)
from fastserve.errors import DataError


def reference_clean(text: str) -> str:
    """Character-by-character reference for clean_text."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    return unicodedata.normalize("NFC", text)


def test_clean_rules_one_by_one():
    assert clean_text("a\r\nb\rc\n") == "a\nb\nc\n"
    assert clean_text("e\u0301") == "\u00e9"  # NFC composes e + combining acute
    assert clean_text("a\x07b\x1b[0m\x7f\x85c\x0c") == "ab[0mc"  # C0, DEL, C1 removed
    assert clean_text("\tx\n") == "\tx\n"  # tab and newline kept
    family = "\U0001f468\u200d\U0001f469"  # ZWJ is a format char (Cf), not a control: kept
    assert clean_text(family) == family
    assert (
        clean_text("e\x07\u0301") == "\u00e9"
    )  # a control between letter and mark is removed first


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_clean_text_matches_reference(text):
    out = clean_text(text)
    assert out == reference_clean(text)
    assert unicodedata.is_normalized("NFC", out)


def test_files_decoding_and_skips(tmp_path, write):
    write(tmp_path / "good.txt", "hello\n")
    write(tmp_path / "bom.txt", "\ufeffwith bom\n".encode())
    write(tmp_path / "bin.dat", b"\x89PNG\x00\x00data")
    write(tmp_path / "latin1.txt", "caf\xe9\n".encode("latin-1"))
    write(tmp_path / "blank.txt", " \n\t\n")
    corpus = load_corpus([str(tmp_path)], val_fraction=0.0)
    assert sorted(corpus.train) == ["hello\n", "with bom\n"]
    skipped = dict(corpus.stats.files_skipped)
    assert set(skipped) == {str(tmp_path / "bin.dat"), str(tmp_path / "latin1.txt")}
    assert "NUL" in skipped[str(tmp_path / "bin.dat")]
    assert "UTF-8" in skipped[str(tmp_path / "latin1.txt")]
    assert corpus.stats.files_read == 3 and corpus.stats.empty_dropped == 1


def test_exact_dedupe_after_cleaning(tmp_path, write):
    write(tmp_path / "a.txt", "same text\nline two\n")
    write(tmp_path / "b.txt", "same text\r\nline two\r\n")  # identical once cleaned
    write(tmp_path / "c.txt", "other\n")
    stats_docs = list(iter_documents([str(tmp_path)]))
    assert [Path(d.source).name for d in stats_docs] == ["a.txt", "c.txt"]  # first one kept
    corpus = load_corpus([str(tmp_path)])
    assert corpus.stats.duplicates_dropped == 1 and corpus.stats.documents == 2


def test_doc_split_is_seeded_and_partitions():
    docs = [f"doc {i}\n" for i in range(50)]
    train, val, mode = split_documents(docs, 0.1, "docs", seed=7)
    assert mode == "docs" and len(val) == 5
    assert sorted(train + val) == sorted(docs)
    assert (train, val) == split_documents(docs, 0.1, "docs", seed=7)[:2]
    assert val != split_documents(docs, 0.1, "docs", seed=8)[1]
    # source order kept inside each split
    assert train == sorted(train, key=docs.index) and val == sorted(val, key=docs.index)
    # at least one val document as soon as there are two
    assert len(split_documents(docs[:2], 0.01, "docs", 0)[1]) == 1


def test_tail_split_is_nanogpt_style():
    text = "".join(f"line number {i}\n" for i in range(100))
    train, val = split_tail(text, 0.1)
    assert train + val == text
    assert train.endswith("\n")  # val starts at a line start
    n = int(len(text) * 0.9)  # nanoGPT: data[:n], data[n:]
    assert len(train) <= n < len(train) + len(val.splitlines(keepends=True)[0])
    # a single document with the default "docs" split falls back to the tail split
    t2, v2, mode = split_documents([text], 0.1, "docs", 0)
    assert mode == "tail" and t2 == [train] and v2 == [val]


def test_bad_split_arguments():
    with pytest.raises(DataError, match="split mode"):
        split_documents(["a"], 0.1, "random", 0)
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(["a"], 1.0, "docs", 0)


def test_jsonl(tmp_path, write):
    rows = [{"text": "first doc"}, {"text": "2nd\u2028doc", "id": 2}, {"body": "x", "text": "3rd"}]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]  # raw U+2028 inside a JSON string
    f = write(tmp_path / "d.jsonl", "\r\n".join(lines) + "\n\n")
    corpus = load_corpus([str(f)], val_fraction=0.0)
    assert corpus.train == ["first doc", "2nd\u2028doc", "3rd"]
    g = write(tmp_path / "e.jsonl", '{"body": "b1"}\n{"body": "b2"}\n')
    assert load_corpus([str(g)], text_field="body", val_fraction=0.0).train == ["b1", "b2"]
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=f"{bad}:2 is not valid JSON"):
        load_corpus([str(bad)])
    with pytest.raises(DataError, match=f"{g}:1 has no 'text' field"):
        load_corpus([str(g)])


def test_directory_globs_recursive(tmp_path, write):
    write(tmp_path / "a.py", "a = 1\n")
    write(tmp_path / "sub" / "deep" / "b.py", "b = 2\n")
    write(tmp_path / "sub" / "c.txt", "c\n")
    write(tmp_path / "d.md", "d\n")
    write(tmp_path / ".git" / "e.py", "hidden = 1\n")
    write(tmp_path / "__pycache__" / "f.py", "cached = 1\n")

    def names(include):
        docs = iter_documents([str(tmp_path)], include=include)
        return [Path(d.source).name for d in docs]

    assert names(["*.py"]) == ["a.py", "b.py"]
    assert names(["*.py", "sub/*.txt"]) == ["a.py", "c.txt", "b.py"]
    assert names(None) == ["a.py", "d.md", "c.txt", "b.py"]


def test_builtin_stdlib_small():
    corpus = load_corpus(["builtin:stdlib"], max_bytes=200_000)
    stats = corpus.stats
    assert stats.documents > 5 and stats.truncated
    assert stats.bytes_train + stats.bytes_val <= 200_000
    assert stats.bytes_train == sum(len(t.encode()) for t in corpus.train)
    assert corpus.val and corpus.sources == ["builtin:stdlib"]
    # default source is the stdlib
    assert load_corpus(None, max_bytes=10_000).sources == ["builtin:stdlib"]


def test_stdlib_file_list():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    assert len(files) > 300 and len(set(files)) == len(files)
    assert files == stdlib_files()  # deterministic order
    rels = [p.relative_to(root).parts for p in files]
    assert all(p[-1].endswith(".py") for p in rels)
    assert not any({"site-packages", "test", "tests"} & set(p) for p in rels)
    assert root / "json" / "decoder.py" in files


def test_max_bytes_cuts_at_newline(tmp_path, write):
    f = write(tmp_path / "big.txt", "".join(f"{i:05d} é\n" for i in range(1000)))
    corpus = load_corpus([str(f)], max_bytes=1000, val_fraction=0.0)
    (text,) = corpus.train
    assert text.endswith("\n") and len(text.encode()) <= 1000 > len(text.encode()) - 9
    assert f.read_text().startswith(text)


def test_errors(tmp_path, monkeypatch, write):
    with pytest.raises(DataError, match="no such file or directory: .*missing.txt"):
        load_corpus([str(tmp_path / "missing.txt")])
    write(tmp_path / "empty" / "a.txt", "\n\n  \n")
    write(tmp_path / "empty" / "b.bin", b"\x00\x01")
    with pytest.raises(DataError, match="empty after cleaning.*1 files skipped"):
        load_corpus([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="unknown builtin corpus"):
        load_corpus(["builtin:nope"])
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="needs the optional `datasets` package"):
        load_corpus(["hf:roneneldan/TinyStories"])
