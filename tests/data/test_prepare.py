"""prepare_data (corpus -> tokenizer -> shards in one call) and the summary table."""

from __future__ import annotations

import numpy as np
import torch
from rich.console import Console

from fastserve.data import Tokenizer, TokenShards, format_report, load_corpus, prepare_data


def render(table) -> str:
    console = Console(record=True, width=120)
    console.print(table)
    return console.export_text()


def test_prepare_stdlib_end_to_end(tmp_path):
    out = tmp_path / "data"
    meta = prepare_data(None, out, vocab_size=400, max_bytes=120_000, progress=False)
    assert meta.path == out and meta.sources == ["builtin:stdlib"]
    assert meta.vocab_size == 400 and meta.stats["tokenizer"]["trained"]
    assert set(meta.stats["seconds"]) == {"corpus", "tokenizer", "shards"}

    # same corpus and tokenizer rebuilt independently -> same token stream
    corpus = load_corpus(None, max_bytes=120_000)
    tokenizer = Tokenizer.train(corpus.train, 400)
    assert tokenizer.fingerprint == meta.tokenizer_fingerprint
    expected = [i for d in corpus.val for i in [*tokenizer.encode(d), tokenizer.eos_token_id]]
    val = TokenShards(out, "val")
    assert val.num_tokens == len(expected)
    x, y = val.get_batch(1, val.num_tokens - 1, torch.Generator().manual_seed(0))
    assert torch.cat([x[0], y[0, -1:]]).tolist() == expected
    assert val.bytes_per_token == sum(len(d.encode()) for d in corpus.val) / len(expected)

    text = render(format_report(meta))
    for split in ("train", "val"):
        info = meta.splits[split]
        assert f"{info.num_documents:,}" in text and f"{info.num_tokens:,}" in text
    assert meta.tokenizer_fingerprint[:12] in text and "stopped early at max_bytes" in text


def test_prepare_reuses_a_tokenizer_and_reports_skips(tmp_path, write):
    write(tmp_path / "src" / "a.txt", "alpha beta gamma\n" * 50)
    write(tmp_path / "src" / "b.txt", "delta epsilon\n" * 50)
    write(tmp_path / "src" / "c.bin", b"\x00\x01\x02")
    first = prepare_data([str(tmp_path / "src")], tmp_path / "one", vocab_size=300, progress=False)
    second = prepare_data(
        [str(tmp_path / "src")],
        tmp_path / "two",
        vocab_size=9999,  # ignored: the tokenizer comes from the first run
        tokenizer_path=tmp_path / "one",
        split="tail",
        progress=True,
    )
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint
    assert second.stats["tokenizer"] == {"loaded_from": str(tmp_path / "one")}
    assert second.splits["val"].num_documents == 2  # tail split: a piece of each document
    a = np.fromfile(tmp_path / "one" / "train_000.bin", dtype=first.dtype)
    assert a.max() < first.vocab_size
    text = render(format_report(second))
    assert "skipped 1 files" in text and "c.bin" in text and "NUL" in text
