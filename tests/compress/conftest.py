"""Compression fixtures: a tiny model dir (in_features multiples of 128, so the int4 presets'
groups of 128 fit) with a trained tokenizer, and a calibration text file. Made once, < 1 s."""

from __future__ import annotations

import pytest
from compress_helpers import tiny_model, tiny_texts


@pytest.fixture(scope="session")
def compress_model_dir(tmp_path_factory):
    from fastserve.data.tokenizer import Tokenizer
    from fastserve.model import save_model

    tokenizer = Tokenizer.train(tiny_texts(200), vocab_size=300)
    path = tmp_path_factory.mktemp("compress") / "model"
    save_model(tiny_model(tokenizer), path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(tiny_texts(60, seed=7)) + "\n", encoding="utf-8")
    return path
