"""What the compression benchmarks share: model dir sizes, decode timing, measured sparsity.

    from bench_common import decode_rates, dir_bytes   # benchmarks/ is on sys.path as a script
    rates = decode_rates(model, batch=16, steps=32, vocab=config.vocab_size, runs=3)

Decode timing: a fixed random prompt of 32 tokens (seed 0) is prefilled into a fresh KV cache,
then `steps` greedy steps are timed, one token per sequence each; a run's rate is batch * steps
over the timed seconds. Callers choose how to reduce the runs (bench_quant: the best of 2, the
first warming the kernel caches up; bench_prune: the median after a discarded warm-up run).
Knows nothing about recipes or evaluation.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

PROMPT_TOKENS = 32


def dir_bytes(path: str | Path) -> int:
    """Bytes of the model dir's safetensors files (the weights; config and tokenizer excluded)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@torch.no_grad()
def decode_rates(model, batch: int, steps: int, vocab: int, runs: int = 2) -> list[float]:
    """Greedy decode tokens/s of each of `runs` runs (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, PROMPT_TOKENS), generator=gen).to(model.device)
    rates = []
    for _ in range(runs):
        cache = model.new_cache(batch, PROMPT_TOKENS + steps)
        nxt = model(prompt, cache)[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            nxt = model(nxt, cache)[:, -1:].argmax(-1)
        rates.append(batch * steps / (time.perf_counter() - start))
    return rates


def num_params(model: nn.Module) -> int:
    """Parameters of a dense model (for a quantized one this counts packed storage, not weights)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def decoder_sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights over all linears inside the decoder layers (a quantized
    linear is dequantized first: a pruned weight is stored as its zero code)."""
    zeros = total = 0
    for module in model.model.layers.modules():
        if hasattr(module, "dequantize"):
            w = module.dequantize()
        elif isinstance(module, nn.Linear):
            w = module.weight
        else:
            continue
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)
