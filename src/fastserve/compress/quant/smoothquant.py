"""SmoothQuant (Xiao et al., 2022): make activations easy to quantize per token by moving their
per-channel outliers into the weights, which are quantized per output channel.

    smooth_layer(layer, run, ["self_attn.q_proj", ...], alpha=0.5)   # then RTN with act_bits=8

For each group reading a normalized input (q/k/v after input_layernorm, gate/up after
post_attention_layernorm), with the calibration maxima a_j = max |X_j| and w_j = max over the
group's linears of |W[:, j]|:  s_j = a_j^alpha / w_j^(1 - alpha), folded into the RMSNorm weight
(divided) and the linears' columns (multiplied): the layer computes the same function, exactly up
to floating point rounding. o_proj and down_proj have no norm before them and are not smoothed.

What it does not know: quantization itself (the RTN/GPTQ modifier that follows does it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from fastserve.compress.calibration import capture_inputs
from fastserve.compress.modifier import LayerContext, ModifierBase, check_float
from fastserve.compress.quant import LAYER_GROUPS, can_fold, fold_scales

_MIN_SCALE = 1e-5


def smooth_scales(act_max: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s [in] from per-channel activation maxima [in] and the group's weights [out_i, in]."""
    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    a = act_max.float()
    s = a.pow(alpha) / w_max.pow(1 - alpha).clamp(min=_MIN_SCALE)
    s = s.clamp(min=_MIN_SCALE)
    return torch.where((a > 0) & (w_max > 0), s, torch.ones_like(s))  # unused channel: leave it


@torch.no_grad()
def smooth_layer(
    layer: nn.Module, run: Callable[[], None], targets: list[str], alpha: float = 0.5
) -> dict[str, Tensor]:
    """Smooth every norm-fed group of `layer` holding a target; returns {group prev: s}."""
    groups = [
        g
        for g in LAYER_GROUPS
        if not isinstance(layer.get_submodule(g.prev), nn.Linear)
        and any(n in targets for n in g.linears)
        and can_fold(layer, g)
    ]
    if not groups:
        return {}
    act_max: dict[str, Tensor] = {}

    def observe(prev: str, args: tuple) -> None:
        m = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
        act_max[prev] = torch.maximum(act_max[prev], m) if prev in act_max else m

    # Every linear of a group reads the same tensor: observing its first linear is enough.
    first = {g.prev: layer.get_submodule(g.linears[0]) for g in groups}
    with capture_inputs(first, observe):
        run()
    scales = {}
    for g in groups:
        weights = [layer.get_submodule(n).weight for n in g.linears]
        s = smooth_scales(act_max[g.prev], weights, alpha)
        fold_scales(layer, g, s)
        scales[g.prev] = s
    return scales


@dataclass
class SmoothQuantModifier(ModifierBase):
    """SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights (fold into
    the RMSNorms before q/k/v and gate/up). Changes no dtype; a quantizing modifier follows."""

    alpha: float = 0.5  # migration strength: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

    type: ClassVar[str] = "SmoothQuant"

    def validate(self) -> None:
        super().validate()
        check_float(self.alpha, "alpha", 0.0, 1.0, hi_open=False)

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]:
        smooth_layer(ctx.layer, ctx.run, list(ctx.targets), self.alpha)
        return {}
