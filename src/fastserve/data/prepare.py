"""The data stage in one call: corpus -> tokenizer (trained or loaded) -> token shards, + a report.

    from fastserve.data import prepare_data, format_report
    meta = prepare_data(["notes/", "extra.jsonl"], "runs/data", vocab_size=4096)
    rich.print(format_report(meta))

The CLI's `fastserve data` calls `prepare_data`. This module only sequences the three steps and
times them; what each step does lives in corpus.py, tokenizer.py and shards.py.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from rich.table import Table

from fastserve.data.corpus import load_corpus
from fastserve.data.shards import ShardMeta, write_shards
from fastserve.data.tokenizer import Tokenizer


def prepare_data(
    sources: list[str] | None,
    out_dir: str | Path,
    vocab_size: int = 4096,
    tokenizer_path: str | Path | None = None,
    include: list[str] | None = None,
    text_field: str = "text",
    val_fraction: float = 0.1,
    split: str = "docs",
    seed: int = 1337,
    max_bytes: int | None = None,
    progress: bool = True,
    shard_tokens: int = 100_000_000,
    num_workers: int | None = None,
    min_frequency: int = 2,
) -> ShardMeta:
    """Read and clean `sources` (default builtin:stdlib), get a tokenizer, write shards to out_dir.

    The tokenizer is trained on the train split only (val stays unseen) unless `tokenizer_path`
    names a tokenizer.json or a model dir to reuse, in which case `vocab_size` is ignored.
    """

    def status(message: str):
        if not progress:
            return contextlib.nullcontext()
        from fastserve.utils.console import err_console

        return err_console.status(message)

    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    with status("reading corpus"):
        corpus = load_corpus(sources, include, text_field, val_fraction, split, seed, max_bytes)
    seconds["corpus"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if tokenizer_path is not None:
        tokenizer = Tokenizer.load(tokenizer_path)
        origin = {"loaded_from": str(tokenizer_path)}
    else:
        with status(f"training a {vocab_size}-token BPE tokenizer"):
            tokenizer = Tokenizer.train(corpus.train, vocab_size, min_frequency)
        origin = {"trained": True, "vocab_size_requested": vocab_size}
    seconds["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    extra = {"tokenizer": origin, "seed": seed, "max_bytes": max_bytes, "seconds": dict(seconds)}
    meta = write_shards(
        corpus,
        tokenizer,
        out_dir,
        shard_tokens=shard_tokens,
        num_workers=num_workers,
        progress=progress,
        extra_stats=extra,
    )
    # Known only after meta.json is written: in the returned meta (for the report), not the file.
    meta.stats["seconds"]["shards"] = time.perf_counter() - t0
    return meta


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def format_report(meta: ShardMeta, max_skipped: int = 5) -> Table:
    """A rich table: documents, bytes, tokens and bytes/token per split, and what was skipped."""
    table = Table(title=f"token shards in {meta.path}" if meta.path else "token shards")
    for col in ("split", "documents", "bytes", "tokens", "bytes/token", "files"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, s in meta.splits.items():
        table.add_row(
            name,
            f"{s.num_documents:,}",
            _human_bytes(s.num_bytes),
            f"{s.num_tokens:,}",
            f"{meta.bytes_per_token(name):.3f}",
            str(len(s.files)),
        )
    corpus = meta.stats.get("corpus", {})
    lines = [
        f"vocab {meta.vocab_size:,} ({meta.dtype}), tokenizer {meta.tokenizer_fingerprint[:12]}",
        f"split mode {corpus.get('split', '?')}; files read {corpus.get('files_read', 0):,}; "
        f"dropped: {corpus.get('duplicates_dropped', 0):,} duplicates, "
        f"{corpus.get('empty_dropped', 0):,} empty",
    ]
    if corpus.get("truncated"):
        lines.append("stopped early at max_bytes")
    skipped = corpus.get("files_skipped", [])
    if skipped:
        lines.append(f"skipped {len(skipped)} files:")
        lines += [f"  {path}: {reason}" for path, reason in skipped[:max_skipped]]
        if len(skipped) > max_skipped:
            lines.append(f"  ... and {len(skipped) - max_skipped} more (see meta.json)")
    seconds = meta.stats.get("seconds")
    if seconds:
        lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table
