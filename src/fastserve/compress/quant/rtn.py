"""Round-to-nearest: min/max scales per (row, group), no calibration data.

    rtn_layer(layer, ["mlp.up_proj", "mlp.down_proj"], QuantScheme(bits=4, group_size=128))
    rtn_layer(layer, ["mlp.down_proj"], {"mlp.down_proj": QuantScheme(bits=4, group_size=32)})

What it does not know: anything about activations (see gptq.py / awq.py for data-aware rounding).
"""

from __future__ import annotations

from torch import nn

from fastserve.compress.quant import Schemes, scheme_of
from fastserve.model.quantized import QuantLinear, replace_linear


def rtn_layer(layer: nn.Module, targets: list[str], scheme: Schemes) -> None:
    """Replace each named linear of `layer` (layer-relative names) by its RTN QuantLinear, with
    `scheme` or, given a mapping, the target's own scheme."""
    for name in targets:
        linear = layer.get_submodule(name)
        replace_linear(layer, name, QuantLinear.from_linear(linear, scheme_of(scheme, name)))
