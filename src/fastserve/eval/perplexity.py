"""Sliding-window log-likelihood over a token stream: per-token NLL, perplexity, bits per byte.

    windows = plan_windows(len(stream), context_len=512, stride=256)
    for batch in batch_windows(windows, batch_size=8):
        logprobs, targets = window_logprobs(model, stream, batch)     # scored tokens only
    nll = token_nll(logits, targets)      # the one NLL of the trainer, benchmarks and eval

A stream is s[0..L-1]; s[0] is the start token (context only), s[1..L-1] are scored. A window
feeds C = context_len inputs s[b : b+C] and predicts the next token at each position, i.e. the
targets s[b+1 : b+C+1] (C + 1 tokens, as the trainer's windows). Window k starts at b = k *
stride; it scores only the targets no earlier window scored, so every token is scored exactly
once and, after the first window, with at least C - stride + 1 tokens of context (Hugging Face's
"perplexity of fixed-length models" scheme). stride == C is the non-overlapping computation.

    stream     0  1  2  3  4  5  6  7  8  9  10        C = 4, stride = 2, L = 11
    window 0  [0  1  2  3]                      targets 1..4, scores 1 2 3 4
    window 1        [2  3  4  5]                targets 3..6, scores 5 6   (contexts 3, 4)
    window 2              [4  5  6  7]          scores 7 8
    window 3                    [6  7  8  9]    scores 9 10  (last window: may be shorter)

Knows nothing about files, tokenizers or reference models (see datasets.py, fidelity.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastserve.eval.stats import stderr

__all__ = [
    "Window",
    "batch_windows",
    "bits_per_byte",
    "nll_from_logprobs",
    "perplexity_stats",
    "plan_windows",
    "token_nll",
    "window_logprobs",
]


@dataclass(frozen=True)
class Window:
    begin: int  # index of the first input token in the stream
    num_inputs: int  # inputs s[begin : begin + num_inputs]; targets are the same span shifted by 1
    num_scored: int  # the last num_scored targets are scored; earlier ones are context only

    @property
    def first_scored(self) -> int:
        """Stream index of the first scored token (the last one is begin + num_inputs)."""
        return self.begin + self.num_inputs - self.num_scored + 1


def plan_windows(num_tokens: int, context_len: int, stride: int) -> list[Window]:
    """The windows that score s[1..num_tokens-1] once each (see the module docstring)."""
    if context_len < 1 or not 1 <= stride <= context_len:
        raise ValueError(f"need 1 <= stride <= context_len, got {stride} and {context_len}")
    windows, begin, last_scored = [], 0, 0  # last_scored 0: only the (unscored) start token
    while last_scored < num_tokens - 1:
        last = min(begin + context_len, num_tokens - 1)  # the window's last target
        windows.append(Window(begin, last - begin, last - last_scored))
        last_scored = last
        begin += stride
    return windows


def batch_windows(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive runs of at most batch_size windows with the same number of inputs."""
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w.num_inputs != batch[0].num_inputs):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """-log softmax(logits)[target] in float32 for logits [..., V] and targets [...].

    reduction "none" keeps the targets' shape; "mean" / "sum" as in F.cross_entropy (which this
    is: the same call the trainer always made, so its losses are unchanged). Equal, bit for bit,
    to -log_softmax(logits.float()).gather(targets), which the eval loop uses to share log-probs
    with the KL computation.
    """
    flat = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction=reduction)
    return flat.view(targets.shape) if reduction == "none" else flat


def bits_per_byte(nll_nats: float, num_bytes: float) -> float:
    """NLL in nats over `num_bytes` bytes -> bits per byte: a total over a total, or a mean per
    token over the bytes per token (the trainer's val_bpb)."""
    return nll_nats / math.log(2) / num_bytes


@torch.inference_mode()
def window_logprobs(
    model, stream: torch.Tensor, windows: list[Window]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [n, V] (float32) at the scored positions of `windows` (all with the same
    num_inputs) and the scored tokens [n], in stream order. `stream` is a 1-D int64 tensor on the
    model's device; `model(input_ids [B, T])` returns logits [B, T, V]."""
    num_inputs = windows[0].num_inputs
    begins = torch.tensor([w.begin for w in windows], device=stream.device)
    buf = stream[begins[:, None] + torch.arange(num_inputs + 1, device=stream.device)]
    logits = model(buf[:, :-1])
    rows = torch.cat([logits[i, num_inputs - w.num_scored :] for i, w in enumerate(windows)])
    targets = torch.cat([buf[i, num_inputs - w.num_scored + 1 :] for i, w in enumerate(windows)])
    return torch.log_softmax(rows.float(), dim=-1), targets


def nll_from_logprobs(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-logprobs[i, targets[i]]: token_nll on log-probabilities that are already computed."""
    return -logprobs.gather(-1, targets[:, None])[:, 0]


def perplexity_stats(nll: np.ndarray, num_bytes: int | None) -> dict:
    """Perplexity and bits per byte from the per-token NLL (nats) of the scored tokens.

    ppl = exp(mean NLL); its stderr is ppl * stderr(NLL) (llama.cpp's first-order propagation);
    bits_per_byte = sum NLL / ln 2 / num_bytes (None when num_bytes is unknown or 0).
    """
    nll = np.asarray(nll, dtype=np.float64)
    if nll.size == 0:
        raise ValueError("no scored tokens")
    total = float(nll.sum())
    mean = total / nll.size
    se = stderr(nll)
    ppl = math.exp(mean)
    return {
        "num_tokens": int(nll.size),
        "nll_sum": total,
        "nll_mean": mean,
        "nll_mean_stderr": se,
        "ppl": ppl,
        "ppl_stderr": None if se is None else ppl * se,
        "bits_per_token": mean / math.log(2),
        "bits_per_byte": bits_per_byte(total, num_bytes) if num_bytes else None,
    }
