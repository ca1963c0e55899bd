"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule.

Pure functions of their arguments: the schedule depends on the step number only, so a resumed run
gets the same learning rates without saving scheduler state. Knows nothing about data or files.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup: step s < warmup_steps gets lr * (s + 1) / warmup_steps, so the first step is
    not wasted at lr 0 and step warmup_steps - 1 reaches lr. Then cosine from lr (at step
    warmup_steps) down to min_lr (at step max_steps); steps past max_steps stay at min_lr.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max_steps - warmup_steps
    if decay_steps <= 0 or step >= max_steps:
        return min_lr if step >= max_steps else lr
    progress = (step - warmup_steps) / decay_steps
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, as in nanoGPT: tensors with dim >= 2 (matmul weights, embeddings) decay;
    vectors (norm gains, biases) do not. Tied tensors appear once (named_parameters dedupes)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device: str
) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel on CUDA, the multi-tensor (foreach) one on CPU.

    Call after the model is on its device and before wrapping it (DDP / compile), so the state
    dict keys follow the plain module's parameter order on every rank.
    """
    fused = device.startswith("cuda")
    return torch.optim.AdamW(
        param_groups(model, weight_decay),
        lr=lr,
        betas=betas,
        fused=fused or None,
        foreach=None if fused else True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
