"""Helpers shared by the compression tests (a module with a unique name: `conftest` is
ambiguous across test directories)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

PROMPTS = [[5, 17, 42, 8], [100, 3, 77, 12, 9, 61]]

WORDS = "the cat sat on a mat while server tokens queue blocks cache model".split()


def tiny_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(n)]


def tiny_config(vocab_size: int = 300, init_std: float = 0.2, **ids):
    """2 layers, hidden 128 (in_features multiples of 128, so int4 groups of 128 fit)."""
    from fastserve.model import ModelConfig

    return ModelConfig.preset(
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


def tiny_model(tokenizer=None, vocab_size: int = 300, seed: int = 1, init_std: float = 0.2):
    from fastserve.model import LlamaForCausalLM

    ids = {}
    if tokenizer is not None:
        vocab_size = tokenizer.vocab_size
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    config = tiny_config(vocab_size, init_std, **ids)
    model = LlamaForCausalLM(config)
    model.init_weights(seed=seed)
    return model


def assert_served_like(out, model, max_tokens: int, loaded=None) -> None:
    """The compressed dir `out`, loaded (or `loaded`, already loaded from it), gives `model`'s
    logits, and the generate path and the engine both produce `model`'s greedy tokens for
    PROMPTS."""
    import torch

    from fastserve import LLM, SamplingParams
    from fastserve.generate import generate
    from fastserve.model import load_model

    loaded = load_model(out) if loaded is None else loaded
    ids = torch.tensor([PROMPTS[1]])
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=1e-5)
    expected = [generate(model, p, max_tokens, temperature=0.0, eos_token_id=None) for p in PROMPTS]
    assert [generate(loaded, p, max_tokens, eos_token_id=None) for p in PROMPTS] == expected
    llm = LLM(str(out), kv_cache_memory="8MiB")
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert engine == expected


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python -m fastserve ARGS` as a real process (wide terminal, 300 s limit)."""
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "fastserve", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
