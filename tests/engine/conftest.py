"""Engine fixtures: a tiny model directory (random weights, a trained tokenizer), made once."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from fastserve.data.tokenizer import Tokenizer
    from fastserve.model import LlamaForCausalLM, ModelConfig, save_model

    rng = random.Random(0)
    words = "the cat sat on a mat while server tokens queue blocks cache model".split()
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)]
    tokenizer = Tokenizer.train(texts, vocab_size=300)
    config = ModelConfig.preset(
        "tiny",
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked logits: greedy ties between paths are practically absent
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.init_weights(seed=1)
    path = tmp_path_factory.mktemp("engine") / "model"
    save_model(model, path, tokenizer=tokenizer)
    return path
