"""Offline quantization algorithms; each turns float decoder layers into `QuantLinear` layers.

rtn.py          round-to-nearest (no data)
gptq.py         GPTQ: Hessian accumulation + column-wise rounding with error feedback
awq.py          AWQ: activation-aware scale search folded into the previous op, clip search, RTN
smoothquant.py  SmoothQuant: activation outliers migrated into weights (then W8A8 RTN)

Each file holds its algorithm's math and its recipe modifier (the lifecycle of
fastserve.compress.modifier). This file holds what they share: `QuantModifier` (the scheme
fields) and the quantization_config summary, the linear groups of a Llama decoder layer, the
per-linear scheme lookup (`Schemes`: one scheme for every target, or one per target, since a
recipe's group size may fall back per linear) and the folding of a per-input-channel scale into
the op before a group, which leaves the layer's function unchanged:

    prev op (RMSNorm weight g, or linear rows)      group linears (columns)
    y = g * norm(x)  ->  y / s                      W  ->  W * s          so  W (y) == (W s)(y / s)

What it does not know: recipe parsing, files, the calibration walk (it gets a `run()` that
performs one pass of the layer over the calibration inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastserve.compress.modifier import (
    LayerTarget,
    ModifierBase,
    ResolveState,
    check_bool,
)
from fastserve.errors import ConfigError
from fastserve.model.quantized import QuantScheme, quantization_modules

MIN_FALLBACK_GROUP_SIZE = 32  # smallest group size group_size_fallback tries before per-channel

# One scheme for every target, or {layer-relative target name: its scheme}.
Schemes = QuantScheme | Mapping[str, QuantScheme]


def scheme_of(schemes: Schemes, name: str) -> QuantScheme:
    """The scheme of target `name` (layer-relative); KeyError when a mapping lacks it."""
    return schemes if isinstance(schemes, QuantScheme) else schemes[name]


@dataclass
class QuantModifier(ModifierBase):
    """A modifier that ends with quantized weights: the scheme's fields."""

    bits: int = 8  # 8, 4 or 3 (3-bit in the 4-bit container)
    group_size: int | None = None  # None = one scale per output channel; else input columns/group
    symmetric: bool = True  # False: unsigned q with an integer zero point per (row, group)
    act_bits: int | None = None  # 8 = dynamic per-token int8 activations (W8A8), else weight-only
    # True: a target whose in_features group_size does not divide gets a smaller group size
    # (see scheme_for) instead of a ConfigError. The int4/int3 presets set it; recipe files must
    # ask for it, since a user who wrote group_size 128 may rely on it.
    group_size_fallback: bool = False

    quantizes: ClassVar[bool] = True

    @property
    def scheme(self) -> QuantScheme:
        """The scheme as written (what scheme_for gives every target its group size divides)."""
        return QuantScheme(self.bits, self.group_size, self.symmetric, self.act_bits)

    def scheme_for(self, in_features: int) -> QuantScheme:
        """The scheme a linear with `in_features` inputs is quantized with: `scheme`, unless
        group_size_fallback is on and group_size does not divide in_features; then the largest of
        group_size / 2, / 4, ... (integers >= MIN_FALLBACK_GROUP_SIZE) that divides it, else
        per-channel (group_size None). Without the flag `scheme` as is (Recipe.resolve rejects
        it when group_size does not divide in_features)."""
        scheme = self.scheme
        g = scheme.group_size
        if g is None or in_features % g == 0 or not self.group_size_fallback:
            return scheme
        while g % 2 == 0 and g // 2 >= MIN_FALLBACK_GROUP_SIZE:
            g //= 2
            if in_features % g == 0:
                return dataclasses.replace(scheme, group_size=g)
        return dataclasses.replace(scheme, group_size=None)

    def validate(self) -> None:
        super().validate()
        self.scheme.validate()
        check_bool(self.group_size_fallback, "group_size_fallback")

    def check_targets(
        self, targets: list[LayerTarget], where: str, state: ResolveState, index: int
    ) -> None:
        """Each target gets its scheme (scheme_for); one that does not fit it, or that an earlier
        modifier quantizes, is a ConfigError naming the linear."""
        for t in targets:
            t.scheme = self.scheme_for(t.in_features)
            try:
                t.scheme.validate(t.in_features)
            except ValueError as e:
                raise ConfigError(f"{where}: {t.name}: {e}") from None
            if t.name in state.quantized_by:
                raise ConfigError(
                    f"{where}: {t.name} is already quantized by modifier "
                    f"{state.quantized_by[t.name] + 1}"
                )
            state.quantized_by[t.name] = index


def _distinct(values: set[Any]) -> Any:
    """One value when all agree, else the sorted list of the distinct ones (None last)."""
    if len(values) == 1:
        return next(iter(values))
    return sorted(v for v in values if v is not None) + ([None] if None in values else [])


def quantization_summary(modifiers: list[Any], model: nn.Module, recipe_name: str) -> dict:
    """The recipe-level fields of config.json's quantization_config (save_model adds the
    per-module schemes): method, bits, group_size, symmetric, act_bits, ignore, recipe.

    `modifiers` are the recipe's quantization-record ones (SmoothQuant included) in order.
    bits ... act_bits summarize the schemes the quantized linears actually have: the value when
    they all agree, else the sorted list of the distinct values (None, e.g. per-channel, last),
    so a preset whose group size fell back on some linears says group_size [64, null]."""
    schemes = list(quantization_modules(model).values()) or [
        m.scheme for m in modifiers if isinstance(m, QuantModifier)
    ]
    summary: dict[str, Any] = {"method": "+".join(m.type.lower() for m in modifiers)}
    for key in ("bits", "group_size", "symmetric", "act_bits"):
        summary[key] = _distinct({getattr(s, key) for s in schemes})
    summary["ignore"] = [
        n for n, m in model.named_modules() if type(m) is nn.Linear
    ]  # linears left in floating point
    summary["recipe"] = recipe_name
    return summary


@dataclass(frozen=True)
class LinearGroup:
    """Linears of a decoder layer that read the same input, in the order a layer computes them."""

    prev: str  # the op whose output is the group's input (RMSNorm or linear), layer-relative
    linears: tuple[str, ...]  # layer-relative names of the linears reading that output
    inspect: str  # the module whose output measures a group's error (AWQ)


LAYER_GROUPS = (
    LinearGroup(
        "input_layernorm",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn",
    ),
    LinearGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    LinearGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    LinearGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


def group_of(local_name: str) -> LinearGroup:
    for g in LAYER_GROUPS:
        if local_name in g.linears:
            return g
    raise ValueError(f"{local_name!r} is not a linear of a Llama decoder layer")


def gqa_groups(layer: nn.Module, group: LinearGroup) -> int:
    """1, or for v_proj -> o_proj under grouped-query attention the number of query heads that
    read each K/V head (o_proj's input channel h * D + d comes from v channel (h // G) * D + d)."""
    prev = layer.get_submodule(group.prev)
    member = layer.get_submodule(group.linears[0])
    if not isinstance(prev, nn.Linear) or prev.out_features == member.in_features:
        return 1
    attn = layer.get_submodule("self_attn") if group.prev == "self_attn.v_proj" else None
    if attn is None or not hasattr(attn, "num_kv_heads"):
        return 0  # not a shape this module knows how to fold
    if (
        prev.out_features != attn.num_kv_heads * attn.head_dim
        or member.in_features != attn.num_heads * attn.head_dim
    ):
        return 0
    return attn.num_heads // attn.num_kv_heads


def tie_gqa(layer: nn.Module, group: LinearGroup, s: Tensor) -> Tensor:
    """A per-input-channel vector of the group's linears made foldable: under grouped-query
    attention the channels that share a v channel get their mean (identity otherwise)."""
    g = gqa_groups(layer, group)
    if g <= 1:
        return s
    d = layer.get_submodule("self_attn").head_dim
    tied = s.view(-1, g, d).mean(dim=1, keepdim=True)
    return tied.expand(-1, g, d).reshape(-1)


def can_fold(layer: nn.Module, group: LinearGroup) -> bool:
    """Whether a scale can be folded: every linear of the group and a linear `prev` still float,
    and the channel counts match (v_proj -> o_proj under grouped-query attention folds through
    the head layout, with the scales of channels sharing a v channel tied: `tie_gqa`)."""
    members = [layer.get_submodule(n) for n in group.linears]
    if not all(type(m) is nn.Linear for m in members):
        return False
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        return type(prev) is nn.Linear and gqa_groups(layer, group) >= 1
    return hasattr(prev, "weight") and prev.weight.shape[0] == members[0].in_features


@torch.no_grad()
def fold_scales(layer: nn.Module, group: LinearGroup, s: Tensor) -> None:
    """Divide the group's input channels by s (in `prev`) and multiply the linears' columns by s.
    `s` has one entry per input channel of the group's linears (tied by `tie_gqa` under
    grouped-query attention; prev then divides each v channel by its shared value)."""
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        g = gqa_groups(layer, group)
        s_prev = s
        if g > 1:
            d = layer.get_submodule("self_attn").head_dim
            s_prev = s.view(-1, g, d)[:, 0, :].reshape(-1)
        prev.weight.div_(s_prev.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s_prev.to(prev.bias.dtype))
    else:  # RMSNorm: y = weight * normalized(x)
        prev.weight.div_(s.to(prev.weight.dtype))
    for name in group.linears:
        w = layer.get_submodule(name).weight
        w.mul_(s.to(w.dtype)[None, :])
