"""Structured pruning (Minitron, ShortGPT): remove whole MLP channels, KV groups with their query
heads, and decoder layers, so that the result is a smaller *dense* model that transformers and
the engine load like any other.

    modifiers:
      - type: Structured
        mlp_sparsity: 0.3          # or intermediate_size: 480 (the width to keep)
        head_sparsity: 0.5         # or num_key_value_heads: 2
        layer_sparsity: 0.25       # or num_hidden_layers: 6

Importance comes from one pass of the calibration tokens through the dense model; every score is
measured before anything is removed (as Minitron and ShortGPT do):
  - MLP channel j of a layer: ||a_j||_2 * ||W_down[:, j]||_2, a_j = down_proj's input channel j
    over all tokens: the norm of what the channel adds to the residual stream (Wanda's
    |W_ij| ||X_j|| summed in quadrature over the column);
  - KV group g: sum over tokens of ||W_o[:, G_g] x_G_g||^2, x = o_proj's input and G_g the
    columns of the group's query heads: exactly the term that dropping the group removes from
    the attention output (heads do not interact before o_proj);
  - decoder layer l: block influence BI_l = 1 - mean over tokens of cos(x_l, y_l), its input and
    output hidden states (ShortGPT); the layers with the lowest BI go.
Each layer keeps its highest-scoring channels and groups, the same number in every layer (an HF
Llama config holds one width; counts and rounding: shrink.py); ties drop the lower index first.

Lifecycle. All the work happens in `initialize` (a whole-model step: the walk, then
shrink.shrink_model), so it must be the recipe's first modifier, and the modifiers after it are
resolved on the smaller model (`Recipe.resolve` calls `reshape_config`) and run on it. It adds
no config.json record: the saved config.json has the smaller widths, recipe.yaml says how they
came about, and `summary()` becomes CompressResult.structure.

What it does not know: the tensor surgery and counts (shrink.py), how layers are walked
(calibration.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastserve.compress.calibration import LayerWalker, capture_inputs
from fastserve.compress.modifier import (
    DEFAULT_IGNORE,
    DEFAULT_TARGETS,
    LayerContext,
    LayerTarget,
    ModifierBase,
    Session,
    check_float,
)
from fastserve.compress.prune.masks import lowest
from fastserve.compress.prune.shrink import StructurePlan, Widths, pruned_widths, shrink_model
from fastserve.compress.prune.wanda import SquaredNormAccumulator
from fastserve.errors import ConfigError
from fastserve.model.config import ModelConfig

_DIMENSIONS = (  # (fraction field, absolute-target field)
    ("mlp_sparsity", "intermediate_size"),
    ("head_sparsity", "num_key_value_heads"),
    ("layer_sparsity", "num_hidden_layers"),
)


# ---- importance ----------------------------------------------------------------------------------


class GroupOutputAccumulator:
    """Per KV group: the summed squared norm over tokens of what its query heads add to the
    output of o_proj (float64)."""

    def __init__(self, o_proj: nn.Linear, num_groups: int) -> None:
        self.weight = o_proj.weight.detach()  # [hidden, num_heads * head_dim]
        self.num_groups = num_groups
        self.sum = torch.zeros(num_groups, dtype=torch.float64, device=self.weight.device)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        width = x.shape[1] // self.num_groups
        for g in range(self.num_groups):
            cols = slice(g * width, (g + 1) * width)
            y = x[:, cols] @ self.weight[:, cols].float().T
            self.sum[g] += y.double().pow(2).sum()


class BlockInfluence:
    """ShortGPT's BI = 1 - mean cos(x, y) over tokens of a layer's input x and output y."""

    def __init__(self) -> None:
        self.cos_sum, self.num_tokens = 0.0, 0

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor) -> None:
        cos = F.cosine_similarity(x.double(), y.double(), dim=-1)
        self.cos_sum += float(cos.sum())
        self.num_tokens += cos.numel()

    @property
    def value(self) -> float:
        return 1.0 - self.cos_sum / max(self.num_tokens, 1)


def mlp_channel_scores(sq_norm: Tensor, down_weight: Tensor) -> Tensor:
    """||a_j||^2 * ||W_down[:, j]||^2 [intermediate] from the channels' sums of squares."""
    return sq_norm.double() * down_weight.detach().double().pow(2).sum(dim=0)


@dataclass
class LayerScores:
    """Importance of one decoder layer's units on the calibration tokens (dense model)."""

    channels: Tensor  # [intermediate_size] float64, mlp_channel_scores
    kv_groups: Tensor  # [num_key_value_heads] float64, GroupOutputAccumulator.sum
    block_influence: float  # BlockInfluence.value


@torch.no_grad()
def collect_scores(
    model: nn.Module, input_ids: Tensor, device: torch.device | str = "cpu"
) -> list[LayerScores]:
    """One calibration pass over the dense model: every layer's scores (module docstring)."""
    walker = LayerWalker(model, input_ids, device=device)
    num_groups = model.config.num_key_value_heads
    scores = []
    for idx in range(walker.num_layers):
        layer = walker.layer(idx)
        down, o_proj = layer.mlp.down_proj, layer.self_attn.o_proj
        accs: dict[str, Any] = {
            "down": SquaredNormAccumulator.for_linear(down),
            "o": GroupOutputAccumulator(o_proj, num_groups),
        }
        influence = BlockInfluence()
        modules = {"down": down, "o": o_proj}
        with capture_inputs(modules, lambda n, args, accs=accs: accs[n].add(args[0])):
            walker.advance(layer, observe=influence.add)
        channels = mlp_channel_scores(accs["down"].sum, down.weight)
        scores.append(LayerScores(channels.cpu(), accs["o"].sum.cpu(), influence.value))
        model.model.layers[idx] = layer.to("cpu")
    return scores


def kept_units(score: Tensor, num_removed: int) -> Tensor:
    """Indices (ascending) of the units that stay when the num_removed lowest scores go."""
    return torch.nonzero(~lowest(score[None], num_removed)[0]).reshape(-1)


def choose_units(scores: list[LayerScores], widths: Widths) -> StructurePlan:
    """The plan: drop the lowest-BI layers, then in every kept layer its lowest channels and
    KV groups (the same counts everywhere)."""
    influence = torch.tensor([s.block_influence for s in scores], dtype=torch.float64)
    layers = kept_units(influence, widths.num_layers_removed).tolist()
    channels, groups = {}, {}
    for i in layers:
        if widths.num_channels_removed:
            channels[i] = kept_units(scores[i].channels, widths.num_channels_removed)
        if widths.num_groups_removed:
            groups[i] = kept_units(scores[i].kv_groups, widths.num_groups_removed)
    return StructurePlan(layers, channels, groups)


# ---- the modifier --------------------------------------------------------------------------------


def _shape(config: ModelConfig) -> dict[str, int]:
    return {
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "num_hidden_layers": config.num_hidden_layers,
    }


@dataclass
class StructuredPruneModifier(ModifierBase):
    """Remove MLP channels, KV groups (with their query heads) and layers by importance."""

    mlp_sparsity: float = 0.0  # fraction of MLP channels removed in every layer (floor)
    head_sparsity: float = 0.0  # fraction of KV groups removed in every layer, with their q heads
    layer_sparsity: float = 0.0  # fraction of decoder layers removed (lowest block influence)
    intermediate_size: int | None = None  # instead of mlp_sparsity: the MLP width to keep
    num_key_value_heads: int | None = None  # instead of head_sparsity: the KV groups to keep
    num_hidden_layers: int | None = None  # instead of layer_sparsity: the layers to keep

    type: ClassVar[str] = "Structured"
    reshapes: ClassVar[bool] = True
    record_key: ClassVar[str | None] = None

    def validate(self) -> None:
        super().validate()
        if self.targets != list(DEFAULT_TARGETS) or self.ignore != list(DEFAULT_IGNORE):
            raise ValueError(
                "Structured prunes every decoder layer alike (an HF config holds one width per "
                "model): leave targets and ignore at their defaults"
            )
        for frac, target in _DIMENSIONS:
            check_float(getattr(self, frac), frac, 0.0, 1.0)
            value = getattr(self, target)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{target} must be an integer, got {value!r}")
                if getattr(self, frac) != 0:
                    raise ValueError(f"give {frac} or {target}, not both")

    def widths(self, config: ModelConfig, where: str = "Structured") -> Widths:
        """What this modifier keeps of `config` (shrink.pruned_widths); ConfigError when a width
        would fall below one unit or grow, a head count breaks transformers' constraint, or
        nothing would be removed."""
        widths = pruned_widths(
            config,
            **{f: getattr(self, f) for pair in _DIMENSIONS for f in pair},
            where=where,
        )
        if _shape(widths.config) == _shape(config):
            raise ConfigError(
                f"{where} removes nothing from this model ({_shape(config)}); raise a sparsity "
                "or give smaller widths"
            )
        return widths

    def reshape_config(self, config: ModelConfig, where: str) -> ModelConfig:
        """The config of the model after this modifier (Recipe.resolve: the later modifiers are
        resolved on it); remembers the resolve note (resolve_note)."""
        widths = self.widths(config, where)
        self._note = widths.note
        return widths.config

    def resolve_note(self) -> str | None:
        """Why fewer KV groups go than asked, at the last resolve (None: as asked)."""
        return getattr(self, "_note", None)

    @torch.no_grad()
    def initialize(self, session: Session, targets: list[LayerTarget]) -> None:
        model = session.model
        before, params_before = model.config, model.num_parameters()
        widths = self.widths(before)
        scores = collect_scores(model, session.input_ids, session.device)
        plan = choose_units(scores, widths)
        shrink_model(model, plan, widths.config)
        removed = [i for i in range(before.num_hidden_layers) if i not in plan.layers]
        self._summary = {
            "original": _shape(before),
            "pruned": _shape(widths.config),
            "removed_layers": removed,
            "block_influence": [round(s.block_influence, 6) for s in scores],
            "num_parameters": [params_before, model.num_parameters()],
            "note": widths.note,
        }

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]:
        return {}  # everything happened in initialize; the compressor does not walk it

    def summary(self) -> dict[str, Any]:
        """What the last run removed: widths before and after, removed layers (original
        indices), every layer's block influence, parameter counts [before, after]."""
        return dict(getattr(self, "_summary", {}))
