"""Compression stage: model dir + recipe + calibration data -> compressed model dir.

recipe.py       YAML recipes and presets -> ordered, validated modifiers resolved to linears
calibration.py  calibration tokens; the layer-by-layer walk with hooks
quant/          RTN, GPTQ, AWQ, SmoothQuant (offline algorithms producing model.quantized layers)
compressor.py   compress() / compress_model(): the orchestration and the saved directory

    from fastserve.compress import compress
    result = compress("runs/small/model", "w4a16-awq", "builtin:stdlib", "runs/small-awq")
"""

from fastserve.compress.compressor import CompressResult, compress, compress_model
from fastserve.compress.recipe import PRESETS, Recipe

__all__ = ["PRESETS", "CompressResult", "Recipe", "compress", "compress_model"]
