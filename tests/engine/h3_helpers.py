"""Helpers for the runner and attention tests (a plain module: conftest names collide)."""

from __future__ import annotations

import math

import torch

from fastserve.model import LlamaForCausalLM, ModelConfig


@torch.no_grad()
def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A tiny GQA model (vocab 128, 4 query heads over 2 K/V heads) with random O(1) weights."""
    config = ModelConfig.preset("tiny", vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            p.copy_(0.1 * noise)
    return model.to(dtype).eval()


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int):
    """Naive float64 causal attention: q [H, T, D] at positions q_offset.., k/v [H_kv, S, D].

    Query head h reads K/V head h // (H / H_kv). Returns [H, T, D] float64.
    """
    h, t, d = q.shape
    rep = h // k.shape[0]
    out = torch.zeros(h, t, d, dtype=torch.float64)
    for head in range(h):
        kh, vh = k[head // rep].double(), v[head // rep].double()
        for i in range(t):
            n = q_offset + i + 1  # keys 0 .. q_offset + i
            scores = kh[:n] @ q[head, i].double() / math.sqrt(d)
            out[head, i] = torch.softmax(scores, dim=0) @ vh[:n]
    return out
