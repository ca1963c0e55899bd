"""Token shards: documents -> flat uint16/uint32 `.bin` files + `meta.json`; a memmap batch sampler.

Layout of a shard directory (written atomically: a reader sees all of it or none of it):

    meta.json               format_version, tokenizer_fingerprint, vocab_size, dtype, eos_token_id,
                            splits: {train|val: {num_tokens, num_documents, num_bytes, files,
                            file_num_tokens}}, sources, stats
    train_000.bin ...       raw little-endian token ids, no header; a file is cut at exactly
    val_000.bin ...         `shard_tokens` tokens (documents may continue in the next file)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   the tokenizer that made them

The token stream of a split is doc_0 <eos> doc_1 <eos> ...; documents are encoded with special-token
strings treated as text, so the only eos ids in the stream are document ends.

Sampling: a window is block_size + 1 consecutive tokens inside one file (x = window[:-1],
y = window[1:]). File f of n_f tokens has n_f - block_size window starts; all starts of a split are
numbered globally and drawn uniformly with the caller's `torch.Generator`:

    file 0: starts 0 .. n_0-B-1   -> global ids [0, c_0)          c_f = max(n_f - B, 0)
    file 1: starts 0 .. n_1-B-1   -> global ids [c_0, c_0 + c_1)

so the same generator state gives the same batch in any process (the trainer seeds one generator
per micro-batch for exact resume and DDP equivalence). This module knows nothing about models.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve.data.corpus import Corpus
from fastserve.data.tokenizer import Tokenizer
from fastserve.errors import DataError
from fastserve.utils.io import atomic_dir, atomic_write_json

FORMAT_VERSION = 1
META_FILE = "meta.json"
_BATCH_CHARS = 4 << 20  # text per encode_batch call: big enough to keep all cores busy


@dataclass
class SplitMeta:
    num_tokens: int  # tokens in the split, eos tokens included
    num_documents: int  # documents (each followed by one eos)
    num_bytes: int  # UTF-8 bytes of the documents' text (eos excluded): for bits-per-byte
    files: list[str]  # shard file names, in stream order
    file_num_tokens: list[int]  # tokens in each file, same order as `files`


@dataclass
class ShardMeta:
    tokenizer_fingerprint: str  # Tokenizer.fingerprint of the tokenizer that encoded the shards
    vocab_size: int
    dtype: str  # "uint16" or "uint32"
    eos_token_id: int  # appended after every document
    splits: dict[str, SplitMeta]
    sources: list[str] = field(default_factory=list)  # corpus sources as given
    stats: dict[str, Any] = field(default_factory=dict)  # corpus stats, timings, tokenizer origin
    format_version: int = FORMAT_VERSION
    path: Path | None = None  # directory it was loaded from / written to (not serialised)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return {"format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> ShardMeta:
        d = dict(d)
        splits = {name: SplitMeta(**s) for name, s in d.pop("splits").items()}
        meta = cls(splits=splits, path=path, **d)
        for name, s in meta.splits.items():
            if len(s.files) != len(s.file_num_tokens) or sum(s.file_num_tokens) != s.num_tokens:
                raise ValueError(f"split {name!r} token counts do not add up")
        np.dtype(meta.dtype)  # raises TypeError on an unknown dtype name
        return meta

    @classmethod
    def load(cls, data_dir: str | Path) -> ShardMeta:
        """Read `data_dir/meta.json`; a missing, corrupt or unknown-version file is a DataError."""
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise DataError(f"no such shard directory: {data_dir}")
        meta_path = data_dir / META_FILE
        if not meta_path.is_file():
            raise DataError(f"{data_dir} has no {META_FILE}; prepare it with `fastserve data`.")
        try:
            d = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path} is corrupt (not valid JSON: {e}).") from None
        version = d.get("format_version") if isinstance(d, dict) else None
        if version != FORMAT_VERSION:
            raise DataError(
                f"{meta_path} has format_version {version!r}; "
                f"this FastServe reads {FORMAT_VERSION}."
            )
        try:
            return cls.from_dict(d, path=data_dir)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{meta_path} is corrupt ({e}).") from None

    def bytes_per_token(self, split: str) -> float:
        s = self.splits[split]
        return s.num_bytes / s.num_tokens if s.num_tokens else 0.0


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, i.e. any vocab of up to 2**16 entries."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def check_tokenizer(meta: ShardMeta, tokenizer: Tokenizer) -> None:
    """DataError unless `tokenizer` is the one the shards were written with."""
    if tokenizer.fingerprint != meta.tokenizer_fingerprint:
        raise DataError(
            f"shards in {meta.path} were made with a different tokenizer (fingerprint "
            f"{meta.tokenizer_fingerprint[:12]}, given {tokenizer.fingerprint[:12]}); use the "
            f"tokenizer saved in that directory or prepare the data again."
        )


# ---- writing ----------------------------------------------------------------------------------


class _ShardWriter:
    """Appends token arrays to `{split}_{i:03d}.bin`, starting a new file every shard_tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.files: list[str] = []
        self.file_num_tokens: list[int] = []
        self._f = None
        self._open_next()  # always at least one file, so an empty split still has val_000.bin

    def _open_next(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"{self.split}_{len(self.files):03d}.bin"
        self._f = open(self.folder / name, "wb")  # noqa: SIM115 - closed in close()/_open_next
        self.files.append(name)
        self.file_num_tokens.append(0)

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            room = self.shard_tokens - self.file_num_tokens[-1]
            if room == 0:
                self._open_next()
                continue
            part, tokens = tokens[:room], tokens[room:]
            self._f.write(part.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self.file_num_tokens[-1] += len(part)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _batches(docs: list[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _flatten(encoded: list[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    flat: list[int] = []
    for ids in encoded:
        flat.extend(ids)
        flat.append(eos)
    return np.array(flat, dtype=dtype)


def write_shards(
    corpus: Corpus,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    shard_tokens: int = 100_000_000,
    num_workers: int | None = None,
    progress: bool = True,
    extra_stats: dict[str, Any] | None = None,
) -> ShardMeta:
    """Encode `corpus` with `tokenizer` into shard files + meta.json in `out_dir` (atomically).

    num_workers: 1 encodes on one core in this thread; anything else uses the tokenizers Rust
    thread pool (all cores, or RAYON_NUM_THREADS if set before its first use). Both give identical
    shards. (No process pool: spawn workers would need the caller's `if __name__ == "__main__"`.)
    An existing `out_dir` is replaced only if it is a shard directory (has meta.json).
    """
    out_dir = Path(out_dir).expanduser()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            "the tokenizer has no eos token, which token shards need between documents."
        )
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}.")
    is_other = out_dir.exists() and not (out_dir / META_FILE).is_file()
    if is_other and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"refusing to overwrite {out_dir}: it exists and is not a shard directory.")
    dtype = token_dtype(tokenizer.vocab_size)
    split_docs = {"train": corpus.train, "val": corpus.val}
    total_chars = sum(len(d) for docs in split_docs.values() for d in docs)

    splits: dict[str, SplitMeta] = {}
    with atomic_dir(out_dir) as tmp, _progress(progress) as bar:
        task = bar.add_task("encoding", total=total_chars) if bar else None
        for split, docs in split_docs.items():
            writer = _ShardWriter(tmp, split, dtype, shard_tokens)
            try:
                for batch in _batches(docs):
                    encoded = tokenizer.encode_batch(
                        batch, split_special_tokens=True, parallel=num_workers != 1
                    )
                    writer.write(_flatten(encoded, eos, dtype))
                    if bar:
                        bar.update(task, advance=sum(len(d) for d in batch))
            finally:
                writer.close()
            splits[split] = SplitMeta(
                num_tokens=sum(writer.file_num_tokens),
                num_documents=len(split_docs[split]),
                num_bytes=sum(len(d.encode("utf-8")) for d in split_docs[split]),
                files=writer.files,
                file_num_tokens=writer.file_num_tokens,
            )
        tokenizer.save_pretrained(tmp)
        meta = ShardMeta(
            tokenizer_fingerprint=tokenizer.fingerprint,
            vocab_size=tokenizer.vocab_size,
            dtype=dtype.name,
            eos_token_id=eos,
            splits=splits,
            sources=list(corpus.sources),
            stats={"corpus": corpus.stats.to_dict(), **(extra_stats or {})},
        )
        atomic_write_json(tmp / META_FILE, meta.to_dict())  # last: marks the dir complete
    meta.path = out_dir
    return meta


def _progress(enabled: bool):
    """A rich progress bar on stderr (stdout stays for results), or a no-op context."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn

    from fastserve.utils.console import err_console

    return Progress(
        "[bold]{task.description}",
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )


# ---- reading ----------------------------------------------------------------------------------


class TokenShards:
    """Read-only memmaps over one split of a shard directory, with a random-window sampler."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.meta = ShardMeta.load(data_dir)
        self.data_dir = Path(data_dir).expanduser()
        self.split = split
        if split not in self.meta.splits:
            raise DataError(f"{self.data_dir} has no {split!r} split.")
        info = self.meta.splits[split]
        dtype = np.dtype(self.meta.dtype).newbyteorder("<")
        self.arrays: list[np.ndarray] = []
        for name, n in zip(info.files, info.file_num_tokens):
            path = self.data_dir / name
            if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
                raise DataError(f"shard {path} is missing or truncated (expected {n} tokens).")
            # np.memmap cannot map an empty file; an empty shard is an empty array.
            arr = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
            self.arrays.append(arr)
        self.file_num_tokens = list(info.file_num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.file_num_tokens)

    @property
    def num_bytes(self) -> int:
        return self.meta.splits[self.split].num_bytes

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token of this split; bits-per-byte = loss_nats / ln 2 / this."""
        return self.meta.bytes_per_token(self.split)

    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    def _window_counts(self, block_size: int) -> np.ndarray:
        if block_size < 1:
            raise DataError(f"block_size must be positive, got {block_size}.")
        counts = np.array([max(n - block_size, 0) for n in self.file_num_tokens], dtype=np.int64)
        if counts.sum() == 0:
            largest = max(self.file_num_tokens, default=0)
            raise DataError(
                f"the {self.split} split in {self.data_dir} has {largest} tokens in its largest "
                f"shard, too few for block_size {block_size} (needs {block_size + 1}); use a "
                f"smaller block_size or more data."
            )
        return counts

    def num_windows(self, block_size: int) -> int:
        """How many distinct windows of block_size + 1 tokens the split holds."""
        return int(self._window_counts(block_size).sum())

    def sample_windows(
        self, batch_size: int, block_size: int, generator: torch.Generator
    ) -> list[tuple[int, int]]:
        """`batch_size` (file index, start offset) pairs drawn uniformly with `generator`."""
        counts = self._window_counts(block_size)
        ends = np.cumsum(counts)
        ids = torch.randint(0, int(ends[-1]), (batch_size,), generator=generator).numpy()
        files = np.searchsorted(ends, ids, side="right")
        starts = ids - (ends[files] - counts[files])
        return [(int(f), int(s)) for f, s in zip(files, starts)]

    def read_windows(self, windows: list[tuple[int, int]], block_size: int) -> torch.Tensor:
        """int64 tensor [len(windows), block_size + 1] of the tokens at those windows."""
        out = np.empty((len(windows), block_size + 1), dtype=np.int64)
        for row, (f, s) in enumerate(windows):
            out[row] = self.arrays[f][s : s + block_size + 1]
        return torch.from_numpy(out)

    def get_batch(
        self,
        batch_size: int,
        block_size: int,
        generator: torch.Generator,
        device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors [batch_size, block_size] of random windows, y = x shifted by one.

        `generator` is a CPU torch.Generator; its state alone decides the batch.
        """
        buf = self.read_windows(self.sample_windows(batch_size, block_size, generator), block_size)
        device = torch.device(device)
        if device.type == "cuda":
            buf = buf.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            buf = buf.to(device)
        return buf[:, :-1], buf[:, 1:]

    def iter_batches(
        self, batch_size: int, block_size: int, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every non-overlapping window of the split, in order (a full evaluation pass)."""
        self._window_counts(block_size)
        windows = [
            (f, s)
            for f, n in enumerate(self.file_num_tokens)
            for s in range(0, n - block_size, block_size)
        ]
        for i in range(0, len(windows), batch_size):
            buf = self.read_windows(windows[i : i + batch_size], block_size).to(device)
            yield buf[:, :-1], buf[:, 1:]
