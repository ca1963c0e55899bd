"""Fixtures for the trainer tests: one small token-shard dir, made once per session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

_SUBJECTS = ["the cat", "a dog", "my friend", "the parser", "our server", "this token"]
_VERBS = ["reads", "writes", "sees", "returns", "builds", "skips"]
_OBJECTS = ["the file", "a list", "two bytes", "the model", "every line", "one batch"]


def synthetic_text(num_lines: int, seed: int) -> str:
    """Template sentences: structured enough that a tiny model's loss falls within 30 steps."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        s, v, o = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        lines.append(f"{i % 10}: {s} {v} {o}.")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    from fastserve.data import prepare_data

    root = tmp_path_factory.mktemp("train_data")
    for i in range(4):
        (root / "corpus").mkdir(exist_ok=True)
        (root / "corpus" / f"doc{i}.txt").write_text(synthetic_text(300, seed=i))
    out = root / "shards"
    prepare_data([str(root / "corpus")], out, vocab_size=320, split="tail", progress=False)
    return out
