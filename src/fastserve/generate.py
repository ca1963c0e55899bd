"""Single-sequence text generation with a contiguous KV cache: the reference decoding loop.

    ids = generate(model, prompt_ids, max_new_tokens=50, temperature=0.8, top_p=0.95, seed=0)
    out = generate_output(model, prompt_ids, 50)      # same, plus why it stopped

The prompt is prefilled once, then one token per forward. Generation stops at `eos_token_id`
(which is included in the output, as in HF), after `max_new_tokens`, or when the sequence reaches
the model's context (`max_position_embeddings`); the last case is reported, never an exception.
Sampling runs on CPU float32 with a seeded generator, so a seed gives the same tokens on any device
for the same logits.

What it does not know: batching, streaming, tokenization, or scheduling (the serving engine's job).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastserve.errors import ConfigError, FastServeError
from fastserve.model.llama import LlamaForCausalLM


@dataclass
class GenerationOutput:
    token_ids: list[int]  # new tokens only (the prompt is not repeated), eos included if hit
    finish_reason: str  # "eos" | "length" (max_new_tokens reached) | "context" (context full)
    message: str  # one sentence for humans saying why generation stopped


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def sample_next_token(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Token ids [...] from logits [..., V]: argmax when temperature == 0, else a sample from
    softmax(logits / temperature) restricted to the top_k tokens and the top_p nucleus (the
    smallest set of most likely tokens whose probability reaches top_p; never empty)."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top-1 never is).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def _eos_set(eos_token_id: int | Iterable[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


@torch.no_grad()
def generate_output(
    model: LlamaForCausalLM,
    input_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    seed: int | None = None,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` after `input_ids`; see the module docstring."""
    _check_sampling(temperature, top_k, top_p)
    if not input_ids:
        raise FastServeError("generation needs a prompt of at least one token")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    context = model.config.max_position_embeddings
    eos = _eos_set(eos_token_id)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    # Every token, prompt and generated, needs a position < context.
    budget = min(max_new_tokens, context - len(input_ids))
    out: list[int] = []
    if budget > 0:
        was_training = model.training
        model.eval()
        try:
            # The last generated token is never fed back, hence the -1.
            cache = model.new_cache(batch_size=1, max_len=len(input_ids) + budget - 1)
            step_input = torch.tensor([input_ids], dtype=torch.long, device=model.device)
            while True:
                logits = model(step_input, cache)[0, -1].cpu()
                token = int(sample_next_token(logits, temperature, top_k, top_p, generator))
                out.append(token)
                if token in eos or len(out) == budget:
                    break
                step_input = torch.tensor([[token]], dtype=torch.long, device=model.device)
        finally:
            model.train(was_training)
    if out and out[-1] in eos:
        return GenerationOutput(out, "eos", f"stopped at end-of-sequence token {out[-1]}")
    if len(out) == max_new_tokens:
        return GenerationOutput(out, "length", f"generated max_new_tokens={max_new_tokens} tokens")
    return GenerationOutput(
        out,
        "context",
        f"stopped after {len(out)} new tokens: the sequence filled the model's context of "
        f"{context} tokens",
    )


def generate(
    model: LlamaForCausalLM,
    input_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    seed: int | None = None,
) -> list[int]:
    """The new token ids only (see `generate_output` for the finish reason)."""
    return generate_output(
        model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed
    ).token_ids
