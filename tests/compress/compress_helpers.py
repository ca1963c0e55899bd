"""Helpers shared by the compression tests (a module with a unique name: `conftest` is
ambiguous across test directories)."""

from __future__ import annotations

import random

WORDS = "the cat sat on a mat while server tokens queue blocks cache model".split()


def tiny_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(n)]


def tiny_model(tokenizer=None, vocab_size: int = 300, seed: int = 1, init_std: float = 0.2):
    from fastserve.model import LlamaForCausalLM, ModelConfig

    ids = {}
    if tokenizer is not None:
        vocab_size = tokenizer.vocab_size
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    config = ModelConfig.preset(
        "tiny",
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=128,
        initializer_range=init_std,  # 0.2: peaked logits, so greedy paths practically never tie
        **ids,
    )
    model = LlamaForCausalLM(config)
    model.init_weights(seed=seed)
    return model
