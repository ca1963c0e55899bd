"""Round-to-nearest: min/max scales per (row, group), no calibration data.

    rtn_layer(layer, ["mlp.up_proj", "mlp.down_proj"], QuantScheme(bits=4, group_size=128))
    rtn_layer(layer, ["mlp.down_proj"], {"mlp.down_proj": QuantScheme(bits=4, group_size=32)})

An exact zero stays exactly zero (symmetric: q = 0; asymmetric: q = the zero point), so RTN keeps
a pruned linear's mask.

What it does not know: anything about activations (see gptq.py / awq.py for data-aware rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from fastserve.compress.modifier import LayerContext
from fastserve.compress.quant import QuantModifier, Schemes, scheme_of
from fastserve.model.quantized import QuantLinear, replace_linear


def rtn_layer(layer: nn.Module, targets: list[str], scheme: Schemes) -> None:
    """Replace each named linear of `layer` (layer-relative names) by its RTN QuantLinear, with
    `scheme` or, given a mapping, the target's own scheme."""
    for name in targets:
        linear = layer.get_submodule(name)
        replace_linear(layer, name, QuantLinear.from_linear(linear, scheme_of(scheme, name)))


@dataclass
class RTNModifier(QuantModifier):
    """Round-to-nearest with min/max scales; needs no calibration data."""

    type: ClassVar[str] = "RTN"
    needs_data: ClassVar[bool] = False

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]:
        rtn_layer(ctx.layer, list(ctx.targets), ctx.schemes)
        return {}
