"""Eval fixtures, made once per session (< 2 s): the tiny model dir, a perturbed copy with the
same tokenizer, a model dir with another tokenizer, a w8a16 (RTN) compressed dir and a text file."""

from __future__ import annotations

import random

import pytest

from tiny_models import WORDS, save_tiny_model_dir, tiny_model, tiny_tokenizer


def words_text(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words)) + "\n"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("eval") / "model")


@pytest.fixture(scope="session")
def perturbed_dir(tmp_path_factory):
    """The tiny model with Gaussian noise (std 0.05) on every weight: same tokenizer."""
    import torch

    from fastserve.model import save_model

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path_factory.mktemp("eval") / "perturbed"
    save_model(model, path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="session")
def other_tokenizer_dir(tmp_path_factory):
    """A model dir whose tokenizer was trained on other text (another tokenizer.json)."""
    from fastserve.data.tokenizer import Tokenizer
    from fastserve.model import save_model

    tokenizer = Tokenizer.train([words_text(60, seed=i)[::-1] for i in range(50)], vocab_size=300)
    path = tmp_path_factory.mktemp("eval") / "other"
    save_model(tiny_model(tokenizer), path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="session")
def compressed_dir(model_dir, tmp_path_factory):
    from fastserve.compress import compress

    out = tmp_path_factory.mktemp("eval") / "w8a16"
    compress(model_dir, "w8a16", None, out)
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    path.write_text(words_text(400, seed=3), encoding="utf-8")
    return path
