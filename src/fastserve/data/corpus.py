"""Raw text in, clean deduplicated documents out, split into train and val.

Sources (a list of strings, read in order):
  - a text file path: one document;
  - a `.jsonl` file: one document per line, taken from the `text_field` of each JSON object;
  - a directory: every file under it (recursively, sorted; `include` globs filter names or relative
    paths), `.jsonl` files read as above; hidden entries and `__pycache__` are not walked;
  - `builtin:stdlib`: the running Python's standard-library `.py` files (test suites and
    site-packages excluded; about 12 MB on CPython 3.11), the default when no source is given;
  - `hf:NAME` or `hf:NAME:CONFIG`: the train split of a Hugging Face dataset, streamed (needs the
    optional `datasets` package and network access).

Cleaning, in this order: UTF-8 decode (files that are binary or not UTF-8 are skipped and reported
in `CorpusStats.files_skipped`), CRLF and CR -> LF, control characters removed (except LF and tab),
Unicode NFC, whitespace-only documents dropped, exact duplicates (sha256 of the cleaned text)
dropped keeping the first. `max_bytes` stops reading once that many cleaned UTF-8 bytes are
kept (the last document is cut at a newline to fit).

This module knows nothing about tokens: it hands lists of strings to the tokenizer and the shard
writer. It does no near-duplicate detection, language filtering or PII scrubbing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import re
import sysconfig
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fastserve.errors import DataError

STDLIB_SOURCE = "builtin:stdlib"
HF_PREFIX = "hf:"
DEFAULT_SOURCES = (STDLIB_SOURCE,)
SPLIT_MODES = ("docs", "tail")

# C0 and C1 control characters except \t (0x09) and \n (0x0a); \r is turned into \n before this.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Directory names never walked under builtin:stdlib: test suites would triple its size and hold
# deliberately odd files.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


@dataclass
class Document:
    text: str  # cleaned text (NFC, \n line ends, no control characters except \n and \t)
    source: str  # where it came from: a path, "path:line" for jsonl, "hf:NAME#row"


@dataclass
class CorpusStats:
    files_read: int = 0  # files (or hf datasets) opened and decoded
    files_skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    documents: int = 0  # documents kept after cleaning, empty-dropping and dedupe
    duplicates_dropped: int = 0  # exact duplicates of an earlier document
    empty_dropped: int = 0  # empty or whitespace-only after cleaning
    documents_train: int = 0  # pieces in each split (tail mode: one per document side kept)
    documents_val: int = 0
    bytes_train: int = 0  # UTF-8 bytes of the cleaned text in each split
    bytes_val: int = 0
    split: str = "docs"  # the split mode actually used ("docs" falls back to "tail" for 1 doc)
    truncated: bool = False  # True when max_bytes stopped reading early

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["files_skipped"] = [list(x) for x in self.files_skipped]
        return d


@dataclass
class Corpus:
    train: list[str]  # training documents, in source order
    val: list[str]  # validation documents, in source order
    stats: CorpusStats
    sources: list[str]  # the sources as given (after defaulting)


def clean_text(text: str) -> str:
    """Normalise line ends to \\n, remove control characters except \\n and \\t, apply NFC."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Controls go before NFC: a control character between a letter and a combining mark would
    # otherwise block their composition, and removing it afterwards would leave non-NFC text.
    text = _CONTROL_RE.sub("", text)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


def decode_bytes(data: bytes) -> tuple[str | None, str]:
    """UTF-8 decode `data`; returns (text, "") or (None, reason it was skipped)."""
    if b"\x00" in data:
        return None, "binary file (contains NUL bytes)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte offset {e.start})"
    return text.removeprefix("\ufeff"), ""


def _walk_files(root: Path, include: list[str] | None, skip_dirs: frozenset[str]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and d != "__pycache__" and d not in skip_dirs
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if include is None or any(
                fnmatch.fnmatch(name, g) or fnmatch.fnmatch(rel, g) for g in include
            ):
                files.append(path)
    return files


def _jsonl_documents(text: str, path: Path, text_field: str) -> Iterator[Document]:
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028 or \x1c, which
    # splitlines() would treat as line ends.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}).") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise DataError(f"{path}:{lineno} has no {text_field!r} field (set text_field).")
        value = obj[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno} field {text_field!r} is not a string.")
        yield Document(value, f"{path}:{lineno}")


def _read_file(path: Path, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    try:
        data = path.read_bytes()
    except OSError as e:
        stats.files_skipped.append((str(path), f"unreadable ({e.strerror})"))
        return
    text, reason = decode_bytes(data)
    if text is None:
        stats.files_skipped.append((str(path), reason))
        return
    stats.files_read += 1
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(text, path, text_field)
    else:
        yield Document(text, str(path))


def _read_hf(spec: str, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    name, _, config = spec[len(HF_PREFIX) :].partition(":")
    try:
        import datasets  # optional dependency, imported only for hf: sources
    except ImportError:
        raise DataError(
            f"{spec} needs the optional `datasets` package (pip install 'fastserve-llm[hf]')."
        ) from None
    try:
        rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
        stats.files_read += 1
        for i, row in enumerate(rows):
            value = row.get(text_field)
            if not isinstance(value, str):
                raise DataError(f"{spec} row {i} has no string field {text_field!r}.")
            yield Document(value, f"{spec}#{i}")
    except DataError:
        raise
    except Exception as e:  # network, auth, unknown name: all reach the user as one sentence
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load Hugging Face dataset {name!r}: {first}") from None


def stdlib_files() -> list[Path]:
    """The running Python's standard-library `.py` files, sorted, test suites excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _walk_files(root, ["*.py"], _STDLIB_SKIP_DIRS)


def check_sources(sources: list[str]) -> None:
    """Fail fast, before any reading, on a path that does not exist or an unknown builtin."""
    for src in sources:
        if src.startswith("builtin:") and src != STDLIB_SOURCE:
            raise DataError(f"unknown builtin corpus {src!r}; the only one is {STDLIB_SOURCE}.")
        if not src.startswith(("builtin:", HF_PREFIX)) and not Path(src).expanduser().exists():
            raise DataError(f"no such file or directory: {src}")


def iter_raw_documents(
    sources: list[str], include: list[str] | None, text_field: str, stats: CorpusStats
) -> Iterator[Document]:
    """Decoded but uncleaned documents from `sources`, in order; records files read and skipped."""
    for src in sources:
        if src == STDLIB_SOURCE:
            for path in stdlib_files():
                yield from _read_file(path, text_field, stats)
        elif src.startswith(HF_PREFIX):
            yield from _read_hf(src, text_field, stats)
        else:
            path = Path(src).expanduser()
            if path.is_dir():
                for f in _walk_files(path, include, frozenset()):
                    yield from _read_file(f, text_field, stats)
            elif path.is_file():
                yield from _read_file(path, text_field, stats)
            else:
                raise DataError(f"no such file or directory: {src}")


def _cut_to_bytes(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` within `max_bytes` UTF-8 bytes, ending at a newline if any."""
    head = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    nl = head.rfind("\n")
    return head[: nl + 1] if nl > 0 else head


def iter_documents(
    sources: list[str],
    include: list[str] | None = None,
    text_field: str = "text",
    max_bytes: int | None = None,
    stats: CorpusStats | None = None,
) -> Iterator[Document]:
    """Clean, non-empty, deduplicated documents from `sources` (see the module docstring)."""
    stats = stats if stats is not None else CorpusStats()
    seen: set[bytes] = set()
    total = 0
    for doc in iter_raw_documents(sources, include, text_field, stats):
        text = clean_text(doc.text)
        if not text.strip():
            stats.empty_dropped += 1
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:
            stats.duplicates_dropped += 1
            continue
        seen.add(digest)
        num_bytes = len(text.encode("utf-8"))
        if max_bytes is not None and total + num_bytes > max_bytes:
            text = _cut_to_bytes(text, max_bytes - total)
            stats.truncated = True
            if text.strip():
                stats.documents += 1
                yield Document(text, doc.source)
            return
        total += num_bytes
        stats.documents += 1
        yield Document(text, doc.source)
        if max_bytes is not None and total >= max_bytes:
            stats.truncated = True
            return


def split_tail(text: str, val_fraction: float) -> tuple[str, str]:
    """Split one document: its last `val_fraction` of characters, from a line start, go to val."""
    cut = len(text) - int(len(text) * val_fraction)
    if cut >= len(text):
        return text, ""
    nl = text.rfind("\n", 0, cut)
    if nl >= 0:
        cut = nl + 1  # val starts at a line start, so it gets at least val_fraction of the text
    return text[:cut], text[cut:]


def split_documents(
    docs: list[str], val_fraction: float, split: str, seed: int
) -> tuple[list[str], list[str], str]:
    """(train, val, split mode used). `docs` mode with a single document falls back to `tail`."""
    if split not in SPLIT_MODES:
        raise DataError(f"unknown split mode {split!r}; use one of {', '.join(SPLIT_MODES)}.")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if split == "docs" and len(docs) == 1 and val_fraction > 0:
        split = "tail"
    if split == "tail":
        train, val = [], []
        for text in docs:
            a, b = split_tail(text, val_fraction)
            if a.strip():
                train.append(a)
            if b.strip():
                val.append(b)
        return train, val, split
    num_val = round(len(docs) * val_fraction)
    if val_fraction > 0 and len(docs) >= 2:
        num_val = min(max(num_val, 1), len(docs) - 1)
    # Seeded choice of val documents; both splits keep source order so output is easy to read.
    val_ids = set(random.Random(seed).sample(range(len(docs)), num_val))
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val, split


def load_corpus(
    sources: list[str] | None = None,
    include: list[str] | None = None,
    text_field: str = "text",
    val_fraction: float = 0.1,
    split: str = "docs",
    seed: int = 1337,
    max_bytes: int | None = None,
) -> Corpus:
    """Read, clean, dedupe and split `sources` (default: builtin:stdlib) into a `Corpus`."""
    sources = list(sources) if sources else list(DEFAULT_SOURCES)
    if split not in SPLIT_MODES:
        raise DataError(f"unknown split mode {split!r}; use one of {', '.join(SPLIT_MODES)}.")
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}.")
    check_sources(sources)
    stats = CorpusStats()
    docs = [d.text for d in iter_documents(sources, include, text_field, max_bytes, stats)]
    if not docs:
        skipped = f" ({len(stats.files_skipped)} files skipped)" if stats.files_skipped else ""
        raise DataError(
            f"the corpus from {', '.join(sources)} is empty after cleaning: "
            f"{stats.files_read} files read{skipped}, {stats.empty_dropped} empty documents."
        )
    train, val, stats.split = split_documents(docs, val_fraction, split, seed)
    stats.documents_train, stats.documents_val = len(train), len(val)
    stats.bytes_train = sum(len(t.encode("utf-8")) for t in train)
    stats.bytes_val = sum(len(t.encode("utf-8")) for t in val)
    return Corpus(train=train, val=val, stats=stats, sources=sources)
