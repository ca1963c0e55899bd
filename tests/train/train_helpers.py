"""Helpers shared by the trainer tests (not in conftest.py: every tests/ dir has one)."""

from __future__ import annotations

from pathlib import Path

from fastserve.train import TrainConfig


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """A run that takes well under a second per 10 steps on 2 CPU cores."""
    base = dict(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        model="tiny",
        batch_size=4,
        block_size=32,
        max_steps=20,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=4,
        eval_interval=10,
        eval_iters=2,
        log_interval=1,
        ckpt_interval=10,
        keep_last=5,
    )
    base.update(overrides)
    return TrainConfig(**base)
