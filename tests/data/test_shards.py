"""Token shards: exact stream contents, meta.json, sampling windows, errors, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastserve.data.corpus import Corpus, CorpusStats
from fastserve.data.shards import (
    ShardMeta,
    TokenShards,
    check_tokenizer,
    token_dtype,
    write_shards,
)
from fastserve.data.tokenizer import Tokenizer
from fastserve.errors import DataError


def reference_stream(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """The split's stream built the slow way: encode each document, append eos."""
    out: list[int] = []
    for d in docs:
        out += tokenizer.encode(d) + [tokenizer.eos_token_id]
    return np.array(out, dtype=np.int64)


def read_split(data_dir, meta: ShardMeta, split: str) -> np.ndarray:
    parts = [np.fromfile(data_dir / f, dtype=meta.dtype) for f in meta.splits[split].files]
    return np.concatenate(parts).astype(np.int64)


@pytest.fixture(scope="module")
def shard_dir(small_corpus, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "data"
    # small shard_tokens forces several files per split, so file boundaries get exercised
    write_shards(small_corpus, tokenizer, out, shard_tokens=5_000, progress=False)
    return out


def test_stream_equals_reference(small_corpus, tokenizer, shard_dir):
    meta = ShardMeta.load(shard_dir)
    for split, docs in (("train", small_corpus.train), ("val", small_corpus.val)):
        ref = reference_stream(tokenizer, docs)
        info = meta.splits[split]
        assert np.array_equal(read_split(shard_dir, meta, split), ref)
        assert info.num_tokens == len(ref) == sum(len(tokenizer.encode(d)) + 1 for d in docs)
        assert info.num_documents == len(docs) == int((ref == tokenizer.eos_token_id).sum())
        assert info.num_bytes == sum(len(d.encode()) for d in docs)
        assert all(n == 5_000 for n in info.file_num_tokens[:-1]) and info.file_num_tokens[-1] > 0
    assert len(meta.splits["train"].files) > 2
    assert meta.dtype == "uint16" and meta.eos_token_id == 1 and meta.vocab_size == 512
    assert meta.sources == ["builtin:stdlib"] and meta.stats["corpus"]["documents"] > 0
    assert Tokenizer.load(shard_dir).fingerprint == meta.tokenizer_fingerprint
    check_tokenizer(meta, tokenizer)  # the right tokenizer passes


def test_single_core_encoding_is_identical(small_corpus, tokenizer, shard_dir, tmp_path):
    meta = write_shards(
        small_corpus, tokenizer, tmp_path / "d", shard_tokens=5_000, num_workers=1, progress=False
    )
    for name in meta.splits["train"].files + meta.splits["val"].files:
        assert (tmp_path / "d" / name).read_bytes() == (shard_dir / name).read_bytes()


def test_eos_string_inside_a_document_stays_text(tokenizer, tmp_path):
    docs = ["before <|eos|> after", "plain"]
    corpus = Corpus(train=docs, val=["v"], stats=CorpusStats(), sources=["mem"])
    meta = write_shards(corpus, tokenizer, tmp_path / "d", progress=False)
    stream = read_split(tmp_path / "d", meta, "train")
    assert int((stream == tokenizer.eos_token_id).sum()) == 2  # one per document, no more
    ends = np.flatnonzero(stream == tokenizer.eos_token_id)
    assert tokenizer.decode(stream[: ends[0]].tolist()) == docs[0]


def test_uint32_for_large_vocab(tokenizer, tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    backend = Tokenizer.train(["ab ab"], vocab_size=300).backend
    backend.add_tokens([f"w{i:05d}w" for i in range(70_000)])
    tok = Tokenizer(backend, "<|bos|>", "<|eos|>", "<|pad|>")
    docs = ["x w69999w y", "w00001w"]
    corpus = Corpus(train=docs, val=["w65600w"], stats=CorpusStats(), sources=[])
    meta = write_shards(corpus, tok, tmp_path / "d", progress=False)
    assert meta.dtype == "uint32"
    assert np.array_equal(read_split(tmp_path / "d", meta, "train"), reference_stream(tok, docs))
    assert read_split(tmp_path / "d", meta, "val").max() > 65_535


def test_windows_match_the_stream(small_corpus, tokenizer, shard_dir):
    shards = TokenShards(shard_dir, "train")
    meta = shards.meta
    files = [np.fromfile(shard_dir / f, dtype=meta.dtype) for f in meta.splits["train"].files]
    block = 64
    windows = shards.sample_windows(256, block, torch.Generator().manual_seed(0))
    assert len({f for f, _ in windows}) == len(files)  # all files get sampled
    batch = shards.read_windows(windows, block)
    for row, (f, s) in enumerate(windows):
        assert s + block + 1 <= len(files[f])  # never crosses a file end
        assert np.array_equal(batch[row].numpy(), files[f][s : s + block + 1].astype(np.int64))

    x, y = shards.get_batch(8, block, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (8, block) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = shards.get_batch(8, block, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same generator seed, same batch
    x3, _ = shards.get_batch(8, block, torch.Generator().manual_seed(4))
    assert not torch.equal(x, x3)
    assert shards.num_windows(block) == sum(len(a) - block for a in files)
    assert shards.bytes_per_token == pytest.approx(shards.num_bytes / shards.num_tokens)


def test_iter_batches_covers_split_in_order(shard_dir):
    shards = TokenShards(shard_dir, "val")
    files = [
        np.fromfile(shard_dir / f, dtype=shards.meta.dtype) for f in shards.meta.splits["val"].files
    ]
    block = 50
    expected = [
        a[s : s + block + 1].astype(np.int64)
        for a in files
        for s in range(0, len(a) - block, block)
    ]
    rows = [row for x, y in shards.iter_batches(7, block) for row in torch.cat([x, y[:, -1:]], 1)]
    assert len(rows) == len(expected)
    assert all(np.array_equal(r.numpy(), e) for r, e in zip(rows, expected))


def test_block_too_large(shard_dir):
    shards = TokenShards(shard_dir, "val")
    with pytest.raises(DataError, match="too few for block_size 5000"):
        shards.get_batch(2, 5_000, torch.Generator().manual_seed(0))


def test_mismatched_tokenizer(small_corpus, shard_dir):
    other = Tokenizer.train(small_corpus.train, vocab_size=400)
    with pytest.raises(DataError, match="made with a different tokenizer"):
        check_tokenizer(ShardMeta.load(shard_dir), other)


def test_bad_shard_dirs(shard_dir, tmp_path):
    import shutil

    with pytest.raises(DataError, match="no such shard directory"):
        ShardMeta.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no meta.json"):
        TokenShards(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text("{truncated")
    with pytest.raises(DataError, match="corrupt"):
        ShardMeta.load(bad)
    (bad / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        ShardMeta.load(bad)
    (bad / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "splits"}))
    with pytest.raises(DataError, match="corrupt"):
        ShardMeta.load(bad)
    (bad / "meta.json").write_text(json.dumps(meta))
    first = bad / meta["splits"]["train"]["files"][0]
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(DataError, match="missing or truncated"):
        TokenShards(bad, "train")
    with pytest.raises(DataError, match="no 'test' split"):
        TokenShards(shard_dir, "test")


def test_interrupted_write_leaves_nothing(
    small_corpus, tokenizer, shard_dir, tmp_path, monkeypatch
):
    calls = []

    def failing(self, texts, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(self, texts, **kw)

    original = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch", failing)
    out = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        write_shards(small_corpus, tokenizer, out, progress=False)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []  # no final dir, no temp dir

    # a failed rewrite leaves the previous complete directory untouched
    import shutil

    keep = tmp_path / "keep"
    shutil.copytree(shard_dir, keep)
    before = {p.name: p.read_bytes() for p in keep.iterdir()}
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        write_shards(small_corpus, tokenizer, keep, progress=False)
    assert {p.name: p.read_bytes() for p in keep.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_refuses_to_overwrite_other_dirs(small_corpus, tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_shards(small_corpus, tokenizer, tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_tokenizer_without_eos(small_corpus, tokenizer, tmp_path):
    tok = Tokenizer(tokenizer.backend, bos_token="<|bos|>", eos_token=None)
    with pytest.raises(DataError, match="no eos token"):
        write_shards(small_corpus, tok, tmp_path / "d", progress=False)
