"""Calibration: token samples, and the layer-by-layer walk that feeds them through the model.

    ids = load_calibration("runs/data", tokenizer, num_samples=128, seq_len=512)  # [N, L] int64
    walker = LayerWalker(model, ids, device="cpu")
    for idx, layer in walker.layers():              # block i sees the outputs of the blocks
        walker.run(layer)                           # before it, as they were compressed
        ... compress `layer` (forward hooks see every mini-batch of calibration inputs) ...
        walker.advance(layer)                       # next inputs = this (compressed) layer's output

Sources: a shard dir written by `fastserve data` (random windows of the train split), a tensor of
token ids, or anything `fastserve data` reads (a text file, a directory, .jsonl, builtin:stdlib)
tokenized with the model's tokenizer (documents joined by eos, random windows). Windows are drawn
with a generator seeded by `seed`, so a run is reproducible.

Memory: the walker keeps one block's activations (N x L x hidden, in mini-batches of about
`tokens_per_batch` tokens) plus the next block's while it advances; the model's layers move to
`device` one at a time.

What this module does not know: the algorithms or the recipe (it only runs layers and hooks).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from fastserve.data.shards import META_FILE, TokenShards, check_tokenizer
from fastserve.data.tokenizer import Tokenizer
from fastserve.errors import DataError

STDLIB = "builtin:stdlib"
_BYTES_PER_TOKEN_GUESS = 8  # generous: read this many bytes of text per calibration token needed


# ---- samples -------------------------------------------------------------------------------------


def _windows(tokens: Tensor, num_samples: int, seq_len: int, seed: int, what: str) -> Tensor:
    if tokens.numel() < seq_len:
        raise DataError(
            f"calibration data {what} has {tokens.numel()} tokens, fewer than one sample of "
            f"{seq_len}; give more data or a smaller --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (num_samples,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def _text_tokens(source: str, tokenizer: Tokenizer, max_tokens: int, seed: int) -> Tensor:
    from fastserve.data.corpus import check_sources, iter_documents

    check_sources([source])
    if tokenizer.eos_token_id is None:
        raise DataError("the model's tokenizer has no eos token to separate calibration documents")
    docs = [d.text for d in iter_documents([source])]
    random.Random(seed).shuffle(docs)  # builtin:stdlib and directories come in sorted order
    budget = max_tokens * _BYTES_PER_TOKEN_GUESS
    picked, size = [], 0
    for d in docs:
        if size >= budget:
            break
        picked.append(d)
        size += len(d)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(picked, split_special_tokens=True):
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def load_calibration(
    source: str | Path | Tensor,
    tokenizer: Tokenizer | None,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> Tensor:
    """Calibration token ids [num_samples, seq_len] (int64) from `source` (see module docstring).

    DataError for a missing, empty or too small source, or shards made by another tokenizer.
    """
    if num_samples < 1 or seq_len < 1:
        raise DataError(f"num_samples and seq_len must be positive, got {num_samples}, {seq_len}")
    if isinstance(source, Tensor):
        ids = source.to(torch.int64)
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise DataError(f"calibration ids must be a non-empty [N, L] tensor, got {ids.shape}")
        return ids[:num_samples, :seq_len]
    src = str(source)
    path = Path(src).expanduser()
    if path.is_dir() and (path / META_FILE).is_file():
        shards = TokenShards(path, "train")
        if tokenizer is not None:
            check_tokenizer(shards.meta, tokenizer)
        largest = max(shards.file_num_tokens, default=0)
        if largest < seq_len:
            raise DataError(
                f"calibration shards {path} hold {largest} tokens in their largest train file, "
                f"fewer than one sample of {seq_len}; give more data or a smaller --seq-len"
            )
        g = torch.Generator().manual_seed(seed)
        windows = shards.sample_windows(num_samples, seq_len - 1, g)  # windows of seq_len tokens
        return shards.read_windows(windows, seq_len - 1)
    if tokenizer is None:
        raise DataError(f"calibration text {src} needs a tokenizer, and the model dir has none")
    tokens = _text_tokens(src, tokenizer, num_samples * seq_len, seed)
    return _windows(tokens, num_samples, seq_len, seed, src)


# ---- the layer walk ------------------------------------------------------------------------------


class LayerWalker:
    """Runs calibration samples through a Llama-family model one decoder layer at a time.

    Invariant: `self.inputs` holds the inputs of the layer about to be processed, as produced by
    the (already compressed) layers before it, in mini-batches [b, L, hidden] on `device`.
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: Tensor,
        device: torch.device | str = "cpu",
        tokens_per_batch: int = 4096,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.num_samples, self.seq_len = input_ids.shape
        self.batch_size = max(1, tokens_per_batch // self.seq_len)
        inner = model.model
        dtype = inner.embed_tokens.weight.dtype
        embed = inner.embed_tokens.to(self.device)
        with torch.no_grad():
            self.inputs = [
                embed(input_ids[i : i + self.batch_size].to(self.device))
                for i in range(0, self.num_samples, self.batch_size)
            ]
        from fastserve.model.llama import rope_cos_sin, rope_inv_freq

        positions = torch.arange(self.seq_len, device=self.device)
        inv_freq = rope_inv_freq(inner.config, device=self.device)
        self.cos, self.sin = rope_cos_sin(inv_freq, positions, dtype)

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    def layer(self, idx: int) -> nn.Module:
        """Decoder layer `idx`, moved to the walker's device."""
        return self.model.model.layers[idx].to(self.device)

    @torch.no_grad()
    def run(self, module: nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
        """(input, output) of `module` (a decoder layer) for every calibration mini-batch."""
        for x in self.inputs:
            yield x, module(x, self.cos, self.sin, None)

    def run_all(self, module: nn.Module) -> None:
        """One full pass of `module` over the calibration inputs (for the hooks it carries)."""
        for _ in self.run(module):
            pass

    @torch.no_grad()
    def advance(
        self,
        layer: nn.Module,
        reference: nn.Module | None = None,
        observe: Callable[[Tensor, Tensor], None] | None = None,
    ) -> float | None:
        """Replace the inputs by `layer`'s outputs (the next layer's inputs). With `reference`
        (the layer before compression), return the relative squared error of the outputs,
        sum ||y - y_ref||^2 / sum ||y_ref||^2 on these same inputs. `observe(x, y)` sees each
        mini-batch's input and output (block influence, structured.py)."""
        outputs, err, norm = [], 0.0, 0.0
        for x, y in self.run(layer):
            if observe is not None:
                observe(x, y)
            if reference is not None:
                y_ref = reference(x, self.cos, self.sin, None)
                err += float((y.double() - y_ref.double()).pow(2).sum())
                norm += float(y_ref.double().pow(2).sum())
            outputs.append(y)
        self.inputs = outputs
        if reference is None:
            return None
        return err / norm if norm > 0 else 0.0


@contextmanager
def capture_inputs(
    modules: dict[str, nn.Module], fn: Callable[[str, tuple], None]
) -> Iterator[None]:
    """Call fn(name, positional args) before each forward of each module; hooks removed after."""
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: fn(name, args))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
