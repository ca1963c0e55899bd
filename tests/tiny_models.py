"""The tiny model most tests serve: a ~100K-parameter Llama (2 layers, GQA) with random weights
and a BPE tokenizer trained in < 1 s. Peaked logits (init std 0.2), so greedy paths practically
never tie and token-for-token comparisons are meaningful. On sys.path via pytest's `pythonpath`."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = "the cat sat on a mat while server tokens queue blocks cache model".split()


def tiny_tokenizer():
    from fastserve.data.tokenizer import Tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    return Tokenizer.train(texts, vocab_size=300)


def tiny_model(tokenizer, max_position_embeddings: int = 128):
    from fastserve.model import LlamaForCausalLM, ModelConfig

    config = ModelConfig.preset(
        "tiny",
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.init_weights(seed=1)
    return model


def save_tiny_model_dir(path: Path, max_position_embeddings: int = 128) -> Path:
    from fastserve.model import save_model

    tokenizer = tiny_tokenizer()
    save_model(tiny_model(tokenizer, max_position_embeddings), path, tokenizer=tokenizer)
    return Path(path)
