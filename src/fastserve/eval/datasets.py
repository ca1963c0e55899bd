"""Evaluation data: text files, directories of text files, or a shard dir's val split, read as
one token stream with its byte count and hash.

    data = load_data("wiki.test.raw", tokenizer, limit=None)   # or a dir, or a shard dir
    data.tokens      # int64 [1 + num_scored]: the start token, then the tokens to score

Conventions (docs/eval.md):
- The stream starts with one start token, never scored: the token the tokenizer itself puts
  before a text (an HF post-processor that adds bos, as Llama's), else eos (FastServe's document
  separator: what precedes every document in its shards), so every token of the text is scored.
- Text: a file is one document, read as UTF-8 unchanged (no cleaning); a directory is every
  non-hidden file under it, sorted by relative path (binary and non-UTF-8 files skipped and
  counted). Documents are encoded as `fastserve data` encodes them (special-token strings are
  text) and joined with one eos between documents.
- Shards (a dir with meta.json): the val split's token stream as written (each document followed
  by eos); the shards must have been made with the target's tokenizer.
- num_bytes, the denominator of bits per byte: the UTF-8 bytes of the documents' text (text),
  the bytes meta.json records for the split (shards), or, when `limit` cuts the stream, the
  UTF-8 bytes of the scored tokens decoded without special tokens ("decoded").
- sha256: of the file's bytes (a file: what `sha256sum FILE` prints); of the lines
  "<sha256>  <relative path>\\n" of the files read (a directory); of the val split's .bin files,
  concatenated (shards).
Knows nothing about models.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastserve.data.corpus import decode_bytes
from fastserve.data.tokenizer import Tokenizer
from fastserve.errors import DataError

__all__ = ["EvalData", "load_data", "start_token_id"]

SPLIT = "val"  # the split of a shard dir that is evaluated


@dataclass
class EvalData:
    name: str  # the source as given
    kind: str  # "text" or "shards"
    tokens: np.ndarray  # int64 [1 + num_scored]: start token, then the scored tokens
    num_bytes: int  # UTF-8 bytes of the scored text (see bytes_source)
    bytes_source: str  # "text", "shard_meta" or "decoded" (the stream was cut by `limit`)
    num_documents: int  # documents read (text: files; shards: the split's documents)
    sha256: str  # hash of what was read (see the module docstring)
    truncated: bool  # True when `limit` cut the stream
    files_skipped: int = 0  # directory files that are binary or not UTF-8

    @property
    def num_scored(self) -> int:
        return len(self.tokens) - 1

    def describe(self) -> dict:
        """The dataset's fields in the results JSON (everything but the tokens)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "sha256": self.sha256,
            "num_documents": self.num_documents,
            "files_skipped": self.files_skipped,
            "num_tokens": self.num_scored,
            "num_bytes": self.num_bytes,
            "bytes_source": self.bytes_source,
            "truncated": self.truncated,
        }


def start_token_id(tokenizer: Tokenizer) -> int:
    """bos when the tokenizer adds it to every text itself (HF post-processor), else eos."""
    with_special = tokenizer.backend.encode("a", add_special_tokens=True).ids
    plain = tokenizer.backend.encode("a", add_special_tokens=False).ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and len(with_special) > len(plain) and with_special[0] == bos:
        return bos
    if eos is not None:
        return eos
    if bos is not None:
        return bos
    raise DataError("the tokenizer has neither a bos nor an eos token to start a stream with.")


def _text_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            files.append(path)
    return files


def _read_text(source: str, path: Path) -> tuple[list[str], str, int]:
    """(documents, sha256, files skipped) of a text file or a directory of them."""
    if path.is_file():
        data = path.read_bytes()
        text, reason = decode_bytes(data)
        if text is None:
            raise DataError(f"cannot evaluate {source}: {reason}.")
        if not text:
            raise DataError(f"{source} is empty.")
        return [text], hashlib.sha256(data).hexdigest(), 0
    docs, lines, skipped = [], [], 0
    for f in _text_files(path):
        data = f.read_bytes()
        text, _ = decode_bytes(data)
        if text is None:
            skipped += 1
            continue
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {f.relative_to(path).as_posix()}\n")
        if text:
            docs.append(text)
    if not docs:
        raise DataError(f"{source} holds no text files to evaluate.")
    return docs, hashlib.sha256("".join(lines).encode("utf-8")).hexdigest(), skipped


def _load_text(source: str, path: Path, tokenizer: Tokenizer, start: int) -> EvalData:
    docs, sha, skipped = _read_text(source, path)
    encoded = tokenizer.encode_batch(docs, split_special_tokens=True)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start
    stream = [start]
    for i, ids in enumerate(encoded):
        if i:
            stream.append(sep)
        stream.extend(ids)
    return EvalData(
        name=source,
        kind="text",
        tokens=np.array(stream, dtype=np.int64),
        num_bytes=sum(len(d.encode("utf-8")) for d in docs),
        bytes_source="text",
        num_documents=len(docs),
        sha256=sha,
        truncated=False,
        files_skipped=skipped,
    )


def _load_shards(source: str, path: Path, tokenizer: Tokenizer, start: int) -> EvalData:
    from fastserve.data.shards import TokenShards, check_tokenizer

    shards = TokenShards(path, SPLIT)
    check_tokenizer(shards.meta, tokenizer)
    if shards.num_tokens == 0:
        raise DataError(f"the {SPLIT} split of {source} is empty.")
    digest = hashlib.sha256()
    for name in shards.meta.splits[SPLIT].files:
        digest.update((path / name).read_bytes())
    return EvalData(
        name=source,
        kind="shards",
        tokens=np.concatenate([[start], *[np.asarray(a, dtype=np.int64) for a in shards.arrays]]),
        num_bytes=shards.num_bytes,
        bytes_source="shard_meta",
        num_documents=shards.meta.splits[SPLIT].num_documents,
        sha256=digest.hexdigest(),
        truncated=False,
    )


def load_data(source: str, tokenizer: Tokenizer, limit: int | None = None) -> EvalData:
    """The stream of `source` (a text file, a directory, or a shard dir with meta.json), cut to
    its first `limit` scored tokens when it is longer. DataError for a missing or empty source,
    shards of another tokenizer, or a stream with nothing to score."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"no such file or directory: {source}")
    start = start_token_id(tokenizer)
    if path.is_dir() and (path / "meta.json").is_file():
        data = _load_shards(source, path, tokenizer, start)
    else:
        data = _load_text(source, path, tokenizer, start)
    if data.num_scored < 1:
        raise DataError(f"{source} has no tokens to score.")
    if limit is not None and data.num_scored > limit:
        data.tokens = data.tokens[: limit + 1]
        text = tokenizer.decode(data.tokens[1:].tolist(), skip_special_tokens=True)
        data.num_bytes = len(text.encode("utf-8"))
        data.bytes_source = "decoded"
        data.truncated = True
    return data
