"""Learning-rate schedule and AdamW parameter groups."""

import math

import pytest
import torch

from fastserve.model import LlamaForCausalLM, ModelConfig
from fastserve.train.optim import build_optimizer, lr_at, param_groups


def reference_lr(step, lr, min_lr, warmup, max_steps):
    """The schedule written out longhand, as a second implementation to compare against."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    t = (step - warmup) / (max_steps - warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2


def test_lr_schedule_warmup_peak_and_cosine_end():
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 110
    values = [lr_at(s, lr, min_lr, warmup, total) for s in range(total + 5)]
    for s, v in enumerate(values):
        assert v == pytest.approx(reference_lr(s, lr, min_lr, warmup, total), rel=1e-12)
    assert values[0] == pytest.approx(lr / warmup)  # the first step already moves
    assert values[warmup - 1] == pytest.approx(lr)
    assert values[warmup] == pytest.approx(lr)
    assert values[warmup + 50] == pytest.approx((lr + min_lr) / 2)  # cosine midpoint
    assert min_lr < values[total - 1] < min_lr * 1.01  # the last step is just above min_lr
    assert all(v == min_lr for v in values[total:])
    assert all(a <= b for a, b in zip(values[:warmup], values[1:warmup]))
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1 :]))


def test_lr_schedule_without_warmup_or_decay():
    assert lr_at(0, 1.0, 0.1, 0, 10) == 1.0
    assert lr_at(5, 1.0, 0.1, 10, 10) == pytest.approx(0.6)  # warmup longer than the run
    assert lr_at(10, 1.0, 0.1, 10, 10) == 0.1


@pytest.mark.parametrize("tied", [True, False])
def test_decay_groups_split_matrices_from_vectors(tied):
    config = ModelConfig.preset(
        "tiny", vocab_size=300, tie_word_embeddings=tied, attention_bias=True
    )
    model = LlamaForCausalLM(config)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in decayed
    assert ("lm_head.weight" in decayed) == (not tied)  # a tied head is the embedding, listed once
    assert any(n.endswith("q_proj.bias") for n in not_decayed)
    assert all(n.endswith(("norm.weight", ".bias")) for n in not_decayed)
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_parameters()  # every parameter exactly once


def test_build_optimizer_settings():
    model = LlamaForCausalLM(ModelConfig.preset("tiny", vocab_size=300))
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.05, betas=(0.8, 0.9), device="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 2e-3 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)
