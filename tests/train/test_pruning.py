"""Training-time pruning on the real loop: the gradual (cubic) schedule step by step, pruned
weights held at exactly 0, lottery rounds with weight and LR rewinding, kill/resume equal to the
uninterrupted run bit for bit, the sparse final model dir served by the engine; bad options."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from train_helpers import tiny_config

from fastserve.errors import ConfigError
from fastserve.model import load_model
from fastserve.train import train
from fastserve.train.checkpoints import checkpoint_dir, list_checkpoints, load_trainer_state
from fastserve.train.metrics import read_metrics
from fastserve.train.optim import lr_at
from fastserve.train.pruning import cubic_sparsity, prunable_linears, scheduled_sparsity

GRADUAL = dict(
    max_steps=16,
    prune="gradual",
    prune_initial_sparsity=0.1,
    prune_sparsity=0.6,
    prune_start_step=2,
    prune_end_step=12,
    prune_interval=3,  # updates after steps 2, 5, 8, 11 and 12
    ckpt_interval=2,
    keep_last=20,
    eval_iters=0,
)
# 14 steps, rewind to step 2, 2 rounds: 3 segments of 4 steps after the rewind step:
# steps 1..6 (LR 0..6), prune + rewind after 6, steps 7..10 (LR 2..6), after 10, steps 11..14.
LOTTERY = dict(
    max_steps=14,
    prune="lottery",
    prune_rounds=2,
    prune_rate_per_round=0.5,
    rewind_step=2,
    ckpt_interval=2,
    keep_last=20,
    eval_iters=0,
)


def _sizes(path) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in prunable_linears(load_model(path)).items()}


def _records(out_dir) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
        for r in read_metrics(out_dir)
    ]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def _masks(out_dir, step) -> dict[str, torch.Tensor]:
    return load_trainer_state(checkpoint_dir(out_dir, step))["pruning"]["masks"]


def test_cubic_formula():
    assert cubic_sparsity(1, 0.1, 0.6, 2, 12) == 0.0  # before t0
    assert cubic_sparsity(2, 0.1, 0.6, 2, 12) == pytest.approx(0.1)
    assert cubic_sparsity(7, 0.1, 0.6, 2, 12) == pytest.approx(0.6 - 0.5 * 0.5**3)
    assert cubic_sparsity(12, 0.1, 0.6, 2, 12) == cubic_sparsity(99, 0.1, 0.6, 2, 12) == 0.6
    # held between updates (every 3 steps from 2), and the end step is an update too
    assert scheduled_sparsity(7, 0.1, 0.6, 2, 12, 3) == cubic_sparsity(5, 0.1, 0.6, 2, 12)
    assert scheduled_sparsity(11, 0.1, 0.6, 2, 12, 3) == cubic_sparsity(11, 0.1, 0.6, 2, 12)
    assert scheduled_sparsity(12, 0.1, 0.6, 2, 12, 3) == 0.6


def test_gradual_pruning_follows_the_schedule_and_zeros_stay(shard_dir, tmp_path):
    cfg = tiny_config(shard_dir, tmp_path / "run", **GRADUAL)
    result = train(cfg, progress=False)
    sizes = _sizes(result.final_dir)
    total = sum(sizes.values())
    for r in read_metrics(cfg.out_dir):  # log_interval 1: every step, exact counts
        s = scheduled_sparsity(r["step"], 0.1, 0.6, 2, 12, 3)
        expected = sum(math.floor(s * n + 1e-9) for n in sizes.values()) / total
        assert r["sparsity"] == expected, r["step"]
    assert read_metrics(cfg.out_dir)[0]["sparsity"] == 0.0  # step 1 < t0
    assert read_metrics(cfg.out_dir)[-1]["sparsity"] == pytest.approx(0.6, abs=1e-3)

    # every checkpoint: the weights are zero exactly where the mask says, masks only grow
    previous = None
    for step, path in list_checkpoints(cfg.out_dir):
        masks, weights = _masks(cfg.out_dir, step), _weights(path)
        for name, mask in masks.items():
            assert torch.equal(weights[f"{name}.weight"] == 0, mask), (step, name)
            if previous is not None:
                assert not (previous[name] & ~mask).any(), (step, name)
        previous = masks
    # the final dir is a sparse (bitmask) checkpoint with the last weights
    sc = json.loads((result.final_dir / "config.json").read_text())["sparsity_config"]
    assert sc["method"] == "train-gradual" and len(sc["modules"]) == len(sizes)
    assert sc["global_sparsity"] == pytest.approx(0.6, abs=1e-3)
    final, last = _weights(result.final_dir), _weights(checkpoint_dir(cfg.out_dir, 16))
    assert all(torch.equal(final[k], last[k]) for k in final)


def _crash_after(out_dir, crashed, step) -> None:
    """A copy of a finished run as a crash right after checkpoint `step` would leave it."""
    shutil.copytree(out_dir, crashed)
    for s, path in list_checkpoints(crashed):
        if s > step:
            shutil.rmtree(path)
    shutil.rmtree(crashed / "model")


@pytest.mark.parametrize(
    ("options", "crash_step"), [(GRADUAL, 6), (LOTTERY, 8)], ids=["gradual", "lottery"]
)
def test_kill_and_resume_is_bit_identical(shard_dir, tmp_path, options, crash_step):
    straight = tiny_config(shard_dir, tmp_path / "straight", **options)
    train(straight, progress=False)
    crashed = tmp_path / "crashed"
    _crash_after(straight.out_dir, crashed, crash_step)
    result = train(tiny_config(shard_dir, crashed, resume=True, **options), progress=False)
    assert result.steps == options["max_steps"]
    assert _records(crashed) == _records(straight.out_dir)  # losses, lr, grad norms, sparsity
    final = _weights(tmp_path / "straight" / "model")
    assert all(torch.equal(final[k], v) for k, v in _weights(crashed / "model").items())
    for step in range(crash_step + 2, options["max_steps"] + 1, 2):
        a, b = _masks(straight.out_dir, step), _masks(crashed, step)
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_lottery_rounds_prune_rewind_and_restart_the_lr(shard_dir, tmp_path):
    cfg = tiny_config(shard_dir, tmp_path / "run", **LOTTERY)
    result = train(cfg, progress=False)
    records = {r["step"]: r for r in read_metrics(cfg.out_dir)}
    sizes = _sizes(result.final_dir)
    total = sum(sizes.values())

    def remaining(n: int, rounds: int) -> int:
        for _ in range(rounds):
            n -= math.floor(0.5 * n)
        return n

    for step, rounds in ((6, 1), (7, 1), (10, 2), (14, 2), (5, 0)):
        kept = sum(remaining(n, rounds) for n in sizes.values())
        assert records[step]["sparsity"] == (total - kept) / total, step
    # LR: segment 0 runs positions 0..5 of a 6-step schedule; later segments positions 2..5
    schedule = [lr_at(i, cfg.lr, cfg.min_lr, cfg.warmup_steps, 6) for i in range(6)]
    assert [records[s]["lr"] for s in range(1, 15)] == schedule + schedule[2:] * 2
    # after step 6 every parameter was rewound to its step-2 value (pruned ones to 0)
    theta_2 = _weights(checkpoint_dir(cfg.out_dir, 2))
    after_6 = _weights(checkpoint_dir(cfg.out_dir, 6))
    masks = _masks(cfg.out_dir, 6)
    for name, value in after_6.items():
        mask = masks.get(name.removesuffix(".weight"))
        expected = theta_2[name] if mask is None else theta_2[name].masked_fill(mask, 0.0)
        assert torch.equal(value, expected), name
    after_8 = _weights(checkpoint_dir(cfg.out_dir, 8))
    assert not all(torch.equal(after_8[k], v) for k, v in after_6.items())  # training went on


@pytest.mark.slow
def test_sparse_final_dir_is_served_by_the_engine(shard_dir, tmp_path):
    from fastserve import LLM, SamplingParams
    from fastserve.generate import generate

    cfg = tiny_config(shard_dir, tmp_path / "run", **{**GRADUAL, "max_steps": 30, "lr": 1e-2})
    result = train(cfg, progress=False)
    loaded = load_model(result.final_dir)
    prompts = [[5, 17, 42, 8], [100, 3, 77, 12, 9, 61]]
    expected = [generate(loaded, p, 8, temperature=0.0, eos_token_id=None) for p in prompts]
    llm = LLM(str(result.final_dir), kv_cache_memory="8MiB")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert engine == expected


BAD = [
    (dict(prune="magic"), "prune must be one of none, gradual, lottery"),
    (dict(prune="gradual", prune_scope="row"), "prune_scope must be one of layer, global"),
    (dict(prune="gradual", prune_sparsity=1.0), r"prune_sparsity must be in \[0, 1\)"),
    (dict(prune="gradual", prune_initial_sparsity=0.7), "prune_initial_sparsity must be in"),
    (dict(prune="gradual", prune_start_step=12, prune_end_step=8), "prune_start_step < prune_"),
    (dict(prune="gradual", prune_end_step=30), "prune_end_step <= max_steps"),
    (dict(prune="gradual", prune_interval=0), "prune_interval must be at least 1"),
    (dict(prune="lottery", prune_rate_per_round=1.0), r"prune_rate_per_round must be in \(0, 1\)"),
    (dict(prune="lottery", prune_rounds=0), "prune_rounds must be at least 1"),
    (dict(prune="lottery", rewind_step=1), r"\(19\) must be a positive multiple of 4 \(e.g. max"),
]


@pytest.mark.parametrize(("options", "match"), BAD)
def test_bad_pruning_options_are_config_errors(shard_dir, tmp_path, options, match):
    cfg = tiny_config(shard_dir, tmp_path / "run", **options)
    with pytest.raises(ConfigError, match=match):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_needs_the_same_pruning(shard_dir, tmp_path):
    options = dict(max_steps=4, eval_iters=0, prune="gradual", prune_end_step=2, prune_interval=1)
    train(tiny_config(shard_dir, tmp_path / "run", **options), progress=False)
    options.update(max_steps=6, prune="none", resume=True)
    with pytest.raises(ConfigError, match="trained with prune='gradual'"):
        train(tiny_config(shard_dir, tmp_path / "run", **options), progress=False)
