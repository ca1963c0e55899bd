"""Checkpoint files: atomic saves, safe loading, and the errors a damaged run dir produces."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_config

from fastserve.data import Tokenizer
from fastserve.errors import CheckpointError
from fastserve.model import LlamaForCausalLM, ModelConfig
from fastserve.train import checkpoints as ckpt
from fastserve.train import train
from fastserve.train.optim import build_optimizer


@pytest.fixture()
def parts(shard_dir):
    model = LlamaForCausalLM(ModelConfig.preset("tiny", vocab_size=320))
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()  # non-empty Adam state (exp_avg, exp_avg_sq, step)
    return model, opt, Tokenizer.load(shard_dir)


def test_save_then_load_round_trips(parts, tmp_path):
    model, opt, tok = parts
    path = ckpt.save_checkpoint(tmp_path, 7, model, opt, tok, {"tokens_seen": 99}, keep_last=3)
    assert path == tmp_path / "checkpoints" / "step_000007" and ckpt.is_complete(path)
    state = ckpt.load_trainer_state(path)  # weights_only=True under the hood
    assert (state["step"], state["tokens_seen"]) == (7, 99)
    saved = state["optimizer"]["state"]
    for i, s in opt.state_dict()["state"].items():
        assert torch.equal(saved[i]["exp_avg_sq"], s["exp_avg_sq"])
    other = LlamaForCausalLM(ModelConfig.preset("tiny", vocab_size=320))
    other.init_weights(seed=123)
    ckpt.load_model_weights(other, path)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values())
    )


def test_failed_save_leaves_nothing_behind(parts, tmp_path, monkeypatch):
    model, opt, tok = parts
    ckpt.save_checkpoint(tmp_path, 1, model, opt, tok, {}, keep_last=3)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, tok, {}, keep_last=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"


def test_corrupt_state_is_a_checkpoint_error(parts, tmp_path):
    model, opt, tok = parts
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, tok, {}, keep_last=3)
    (path / ckpt.STATE_FILE).write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="corrupt or not a trainer state"):
        ckpt.load_trainer_state(path)


def test_resume_with_another_model_shape_names_the_tensor(shard_dir, tmp_path):
    train(tiny_config(shard_dir, tmp_path, max_steps=2, eval_iters=0), progress=False)
    bigger = tiny_config(
        shard_dir, tmp_path, max_steps=4, resume=True, model_overrides={"intermediate_size": 64}
    )
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight"):
        train(bigger, progress=False)
