"""End-to-end training runs on a tiny model: learning, exact resume, stops, outputs, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time

import pytest
import torch
from train_helpers import tiny_config

from fastserve.data import Tokenizer, TokenShards
from fastserve.errors import ConfigError
from fastserve.model import load_model
from fastserve.train import train
from fastserve.train.checkpoints import checkpoint_dir, list_checkpoints
from fastserve.train.metrics import read_metrics


def train_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in records]


def weights(path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def test_loss_decreases_and_outputs_are_written(shard_dir, tmp_path):
    cfg = tiny_config(shard_dir, tmp_path / "run", max_steps=30, eval_interval=15, eval_iters=4)
    result = train(cfg, progress=False)
    records = read_metrics(cfg.out_dir)
    losses = train_losses(cfg.out_dir)
    assert sorted(losses) == list(range(1, 31))
    vocab = load_model(result.final_dir).config.vocab_size
    assert losses[1] == pytest.approx(math.log(vocab), rel=0.1)  # near-uniform at init
    assert sum(losses[s] for s in range(26, 31)) / 5 < losses[1] - 1.5
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[1]["val_loss"] < evals[0]["val_loss"] < math.log(vocab)
    bpt = TokenShards(shard_dir, "val").bytes_per_token
    assert result.val_bpb == pytest.approx(result.last_val_loss / math.log(2) / bpt)
    assert result.steps == 30 and result.stop_reason == "max_steps"
    assert result.last_train_loss == losses[30] and result.tokens_per_s > 0
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(records[0])
    # the final model dir is a complete HF dir equal to the last checkpoint's weights
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (result.final_dir / name).is_file()
    final, last = weights(result.final_dir), weights(checkpoint_dir(cfg.out_dir, 30))
    assert all(torch.equal(final[k], last[k]) for k in final)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["max_steps"] == 30 and run["versions"]["torch"] == torch.__version__


def test_resume_continues_exactly(shard_dir, tmp_path):
    """20 steps straight == a crash after the step-10 checkpoint + resume == a stop after step 1
    (time budget spent) + resume: same losses, grad norms and final weights, bit for bit."""
    straight = tiny_config(shard_dir, tmp_path / "straight")
    train(straight, progress=False)
    reference = read_metrics(straight.out_dir)

    # crash after step 10: the step-20 checkpoint and model never got written; metrics ran on
    crashed = tmp_path / "crashed"
    shutil.copytree(straight.out_dir, crashed)
    shutil.rmtree(checkpoint_dir(crashed, 20))
    shutil.rmtree(crashed / "model")
    result = train(tiny_config(shard_dir, crashed, resume=True), progress=False)
    assert result.steps == 20
    # the old lines past step 10 were dropped on resume: one line per step, same numbers
    assert without_timing(read_metrics(crashed)) == without_timing(reference)

    # a real stop: the time budget runs out after step 1, then resume without a budget
    stopped = tiny_config(shard_dir, tmp_path / "stopped", max_time_s=1e-6)
    first = train(stopped, progress=False)
    assert (first.steps, first.stop_reason) == (1, "max_time")
    assert [s for s, _ in list_checkpoints(stopped.out_dir)] == [1]
    train(tiny_config(shard_dir, tmp_path / "stopped", resume=True), progress=False)

    expected = train_losses(straight.out_dir)
    assert train_losses(crashed) == expected
    assert train_losses(stopped.out_dir) == expected
    final = weights(tmp_path / "straight" / "model")
    for other in (crashed / "model", tmp_path / "stopped" / "model"):
        assert all(torch.equal(final[k], v) for k, v in weights(other).items())


def test_keep_last_and_partial_checkpoints_are_ignored(shard_dir, tmp_path):
    cfg = tiny_config(shard_dir, tmp_path / "run", max_steps=12, ckpt_interval=3, keep_last=2)
    train(cfg, progress=False)
    assert [s for s, _ in list_checkpoints(cfg.out_dir)] == [9, 12]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000009", "step_000012"]

    # debris a crash could leave: a temp dir and a step dir without its trainer state
    shutil.copytree(ckpts / "step_000012", ckpts / ".tmp-step_000015-abc")
    shutil.copytree(ckpts / "step_000012", ckpts / "step_000018")
    (ckpts / "step_000018" / "trainer_state.pt").unlink()
    assert [s for s, _ in list_checkpoints(cfg.out_dir)] == [9, 12]
    result = train(tiny_config(shard_dir, cfg.out_dir, max_steps=14, resume=True), progress=False)
    assert result.steps == 14
    assert train_losses(cfg.out_dir)[13] > 0  # resumed from 12, not from the partial 18
    assert [r["step"] for r in read_metrics(cfg.out_dir) if "loss" in r] == list(range(1, 15))
    assert not (ckpts / ".tmp-step_000015-abc").exists()  # pruned as crash debris


def test_existing_run_needs_resume(shard_dir, tmp_path):
    cfg = tiny_config(shard_dir, tmp_path / "run", max_steps=2, eval_iters=0)
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="already has checkpoints; resume it"):
        train(cfg, progress=False)


def test_block_size_beyond_context_is_a_config_error(shard_dir, tmp_path):
    cfg = tiny_config(
        shard_dir, tmp_path / "run", block_size=64, model_overrides={"max_position_embeddings": 32}
    )
    with pytest.raises(ConfigError, match="block_size 64 is larger than the model's context"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written for a rejected config


def test_bf16_autocast_trains_close_to_fp32(shard_dir, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(shard_dir, tmp_path / dtype, max_steps=8, dtype=dtype, eval_iters=0)
        train(cfg, progress=False)
        runs[dtype] = train_losses(cfg.out_dir)
    assert runs["bfloat16"] != runs["float32"]  # autocast really changed the arithmetic
    for step in (1, 8):
        assert runs["bfloat16"][step] == pytest.approx(runs["float32"][step], rel=0.02)
    assert load_model(tmp_path / "bfloat16" / "model").dtype == torch.float32  # fp32 master weights


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_saves_a_checkpoint_and_stops(shard_dir, tmp_path, signum):
    cfg = tiny_config(shard_dir, tmp_path / "run", max_steps=100_000, ckpt_interval=0)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def interrupt_once_training():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.stat().st_size > 0:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.01)

    # what the process had: SIG_IGN, not Python's handler, when a non-interactive shell starts the
    # suite in the background (`make test &`, CI)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    sender = threading.Thread(target=interrupt_once_training)
    sender.start()
    result = train(cfg, progress=False)
    sender.join()
    assert result.stop_reason == "signal" and 1 <= result.steps < 100_000
    assert [s for s, _ in list_checkpoints(cfg.out_dir)] == [result.steps]
    assert (result.final_dir / "model.safetensors").is_file()
    after = {sig: signal.getsignal(sig) for sig in before}
    assert after == before  # train() put back the handlers it replaced


@pytest.mark.slow
def test_final_dir_loads_in_transformers_with_equal_logits(shard_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(shard_dir, tmp_path / "run", max_steps=3, eval_iters=0)
    result = train(cfg, progress=False)
    ours = load_model(result.final_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(result.final_dir)
    ids = hf_tok("3: the cat reads the file.\n")["input_ids"]
    assert ids == Tokenizer.load(shard_dir).encode("3: the cat reads the file.\n")
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits.float(), ours(x), rtol=1e-4, atol=1e-4)
