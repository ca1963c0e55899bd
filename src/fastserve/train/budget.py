"""Fit a run into a wall-clock budget: how many optimizer steps fit in N seconds on this machine.

    steps = steps_for_budget(cfg, vocab_size=4096, seconds=240)
    train(dataclasses.replace(cfg, max_steps=steps, max_time_s=240 * 1.2))

The learning-rate schedule needs `max_steps` up front (cosine decay must end when the budget does),
so equal-time comparisons and the demo measure a few real optimizer steps of the configured model
on random tokens, then divide. Evaluation time is charged at one forward (~1/3 of a step) per
eval batch. Knows nothing about data files; the result depends on the machine, by design.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from fastserve.train.config import TrainConfig
from fastserve.train.optim import build_optimizer


def seconds_per_step(
    cfg: TrainConfig, vocab_size: int, probe_steps: int = 4, warmup_steps: int = 2
) -> float:
    """Mean time of `probe_steps` optimizer steps (forward, backward, clipping, AdamW) on random
    tokens after `warmup_steps` untimed ones (allocator, caches)."""
    from fastserve.model import LlamaForCausalLM, resolve_config

    config = resolve_config(cfg.model, vocab_size=vocab_size, **cfg.model_overrides)
    model = LlamaForCausalLM(config).to(cfg.device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.device)
    device_type = torch.device(cfg.device).type
    autocast = (
        torch.autocast(device_type, dtype=torch.bfloat16)
        if cfg.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=gen)
    x, y = tokens[:, :-1].to(cfg.device), tokens[:, 1:].to(cfg.device)

    def step() -> None:
        for _ in range(cfg.grad_accum):
            with autocast:
                logits = model(x)
            F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup_steps):
        step()
    if device_type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(probe_steps):
        step()
    if device_type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / probe_steps


def steps_for_budget(cfg: TrainConfig, vocab_size: int, seconds: float, margin: float = 0.9) -> int:
    """Optimizer steps that fit in `seconds` (times `margin`), evaluations included."""
    step_s = seconds_per_step(cfg, vocab_size)
    evals = 0.0
    if cfg.eval_iters > 0 and cfg.eval_interval > 0:
        # each evaluation: eval_iters forwards of one micro-batch, ~1/3 of a training step each
        evals = cfg.eval_iters / (3 * cfg.grad_accum) / cfg.eval_interval
    return max(1, int(seconds * margin / (step_s * (1 + evals))))
