"""Engine fixtures: a tiny model directory (random weights, a trained tokenizer), made once."""

from __future__ import annotations

import pytest

from tiny_models import save_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("engine") / "model")
