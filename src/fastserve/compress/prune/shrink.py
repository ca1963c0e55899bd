"""Structured pruning arithmetic: how many units a config keeps, and the tensor surgery that
turns a Llama-family model into the smaller dense one (every layer alike).

    widths = pruned_widths(config, mlp_sparsity=0.3, head_sparsity=0.3)     # counts only
    plan = StructurePlan(layers=[0, 2], channels={...}, kv_groups={...})     # which units stay
    shrink_model(model, plan, widths.config)                                 # in place

Units. An MLP channel j is row j of gate_proj and up_proj and column j of down_proj. A KV group
g is K/V head g with the query heads that read it (GQA: r = num_attention_heads /
num_key_value_heads of them), i.e. for head_dim D:

    q_proj rows, o_proj columns   [g*r*D, (g+1)*r*D)        the group's r query heads
    k_proj rows, v_proj rows      [g*D, (g+1)*D)            its K/V head

    num_key_value_heads 2, r 2:   q heads  0 1 | 2 3        dropping group 1 drops q heads 2, 3
                                  kv heads  0  |  1         and kv head 1; r stays 2

Removing a whole group keeps r (so num_attention_heads stays divisible by num_key_value_heads)
and keeps HF's head -> KV head map (h // r) intact. A decoder layer is removed whole; the layers
after it are renumbered (their KV-cache slot is their new index).

Counts (one width per model: an HF Llama config holds one intermediate_size and one head count,
so every layer keeps the same number of units, chosen per layer):
  - a fraction s of n units removes floor(s * n) of them (ties of the masks' convention);
  - an absolute target keeps exactly that many (1 <= target <= n, else ConfigError);
  - KV groups: transformers requires hidden_size % num_attention_heads == 0. A target that breaks
    it is a ConfigError; a fraction removes the largest number of groups <= floor(s * G) that
    keeps it (possibly none), and `note` says so.

What it does not know: importance (structured.py decides which units), files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastserve.errors import ConfigError
from fastserve.model.config import ModelConfig


@dataclass
class Widths:
    """What a structured modifier keeps of a config (counts, no indices)."""

    config: ModelConfig  # the pruned model's config (explicit head_dim)
    num_layers_removed: int
    num_channels_removed: int  # per layer
    num_groups_removed: int  # per layer
    note: str | None = None  # why fewer KV groups go than the fraction asks (None: as asked)


def _keep(n: int, sparsity: float, target: int | None, what: str, unit: str, where: str) -> int:
    if target is None:
        return n - math.floor(sparsity * n + 1e-9)
    if target < 1:
        raise ConfigError(
            f"{where}: {what} {target} would leave no {unit}; keep at least 1 (the model has {n})"
        )
    if target > n:
        raise ConfigError(f"{where}: {what} {target} is more than the model's {n}: it cannot grow")
    return target


def _heads_fit(config: ModelConfig, groups: int) -> bool:
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    return config.hidden_size % (groups * heads_per_group) == 0


def pruned_widths(
    config: ModelConfig,
    mlp_sparsity: float = 0.0,
    head_sparsity: float = 0.0,
    layer_sparsity: float = 0.0,
    intermediate_size: int | None = None,
    num_key_value_heads: int | None = None,
    num_hidden_layers: int | None = None,
    where: str = "Structured",
) -> Widths:
    """The config the structured pruning asks for (module docstring); ConfigError when a width
    would fall below one unit, grow, or break transformers' head constraint."""
    channels = _keep(
        config.intermediate_size,
        mlp_sparsity,
        intermediate_size,
        "intermediate_size",
        "MLP channel",
        where,
    )
    layers = _keep(
        config.num_hidden_layers,
        layer_sparsity,
        num_hidden_layers,
        "num_hidden_layers",
        "decoder layer",
        where,
    )
    num_groups = config.num_key_value_heads
    r = config.num_attention_heads // num_groups  # query heads per KV group
    groups = _keep(
        num_groups, head_sparsity, num_key_value_heads, "num_key_value_heads", "KV group", where
    )
    note = None
    valid = [g for g in range(1, num_groups + 1) if _heads_fit(config, g)]
    if not _heads_fit(config, groups):
        if num_key_value_heads is not None:
            raise ConfigError(
                f"{where}: num_key_value_heads {groups} means {groups * r} query heads, which do "
                f"not divide hidden_size {config.hidden_size} (transformers requires it); "
                f"possible: {', '.join(map(str, valid))}"
            )
        asked = groups
        groups = min(g for g in valid if g >= asked)
        note = (
            f"{where}: head_sparsity {head_sparsity} would keep {asked} of {num_groups} KV groups "
            f"({asked * r} query heads do not divide hidden_size {config.hidden_size}); keeping "
            f"{groups}"
        )
    new = config.replace(
        intermediate_size=channels,
        num_hidden_layers=layers,
        num_attention_heads=groups * r,
        num_key_value_heads=groups,
        head_dim=config.head_dim,  # stays: replace() would re-derive it from the new head count
    )
    return Widths(
        new,
        config.num_hidden_layers - layers,
        config.intermediate_size - channels,
        num_groups - groups,
        note,
    )


# ---- surgery -------------------------------------------------------------------------------------


@dataclass
class StructurePlan:
    """Which units of the dense model survive: indices into the original model, ascending."""

    layers: list[int]  # kept decoder layers (original indices)
    channels: dict[int, Tensor]  # original layer index -> kept MLP channels, int64 [channels']
    kv_groups: dict[int, Tensor]  # original layer index -> kept KV groups, int64 [groups']


def group_rows(groups: Tensor, rows_per_group: int) -> Tensor:
    """Row indices [len(groups) * rows_per_group] of the given groups of consecutive rows."""
    offsets = torch.arange(rows_per_group, device=groups.device)
    return (groups[:, None] * rows_per_group + offsets[None, :]).reshape(-1)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.contiguous())
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous())
    return linear


def keep_rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    """A new linear with only `rows` of `linear`'s outputs (bias rows too)."""
    w = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()[rows.to(w.device)]
    return _linear(w[rows.to(w.device)], bias)


def keep_cols(linear: nn.Linear, cols: Tensor) -> nn.Linear:
    """A new linear reading only input features `cols` (the bias is unchanged)."""
    w = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return _linear(w[:, cols.to(w.device)], bias)


@torch.no_grad()
def shrink_model(model: nn.Module, plan: StructurePlan, config: ModelConfig) -> None:
    """Apply `plan` to a LlamaForCausalLM in place and give it `config` (which must describe
    the result: the same number of channels and groups in every kept layer)."""
    old = model.config
    r = old.num_attention_heads // old.num_key_value_heads
    d = old.head_dim
    kept = []
    for new_idx, idx in enumerate(plan.layers):
        layer = model.model.layers[idx]
        if idx in plan.channels:
            ch = plan.channels[idx]
            mlp = layer.mlp
            mlp.gate_proj, mlp.up_proj = keep_rows(mlp.gate_proj, ch), keep_rows(mlp.up_proj, ch)
            mlp.down_proj = keep_cols(mlp.down_proj, ch)
        if idx in plan.kv_groups:
            groups = plan.kv_groups[idx]
            attn = layer.self_attn
            q_rows, kv_rows = group_rows(groups, r * d), group_rows(groups, d)
            attn.q_proj = keep_rows(attn.q_proj, q_rows)
            attn.k_proj, attn.v_proj = (
                keep_rows(attn.k_proj, kv_rows),
                keep_rows(attn.v_proj, kv_rows),
            )
            attn.o_proj = keep_cols(attn.o_proj, q_rows)
            attn.num_heads, attn.num_kv_heads = len(groups) * r, len(groups)
        layer.self_attn.layer_idx = new_idx  # its KV-cache slot
        kept.append(layer)
    model.model.layers = nn.ModuleList(kept)
    for layer in kept:
        attn, mlp = layer.self_attn, layer.mlp
        shapes = (attn.num_kv_heads, attn.num_heads, mlp.down_proj.in_features)
        expected = (
            config.num_key_value_heads,
            config.num_attention_heads,
            config.intermediate_size,
        )
        if shapes != expected:
            raise ValueError(f"layer {attn.layer_idx}: kept {shapes}, the config says {expected}")
    if len(kept) != config.num_hidden_layers:
        raise ValueError(f"kept {len(kept)} layers, the config says {config.num_hidden_layers}")
    model.config = config
    model.model.config = config
