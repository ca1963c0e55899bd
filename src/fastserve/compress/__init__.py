"""Compression stage: model dir + recipe + calibration data -> compressed model dir.

modifier.py     the Modifier lifecycle every algorithm implements (resolve targets, initialize,
                per-layer calibration hooks, finalize, the config.json record it feeds)
recipe.py       YAML recipes and presets -> ordered, validated modifiers resolved to linears
calibration.py  calibration tokens; the layer-by-layer walk with hooks
quant/          RTN, GPTQ, AWQ, SmoothQuant (offline algorithms producing model.quantized layers)
prune/          Magnitude, Wanda, SparseGPT, OWL (zeroed weights, saved as bitmasks);
                Structured (fewer channels, KV groups and layers: a smaller dense model)
share/          KMeans weight sharing (2^bits values per tensor, saved deep-compressed:
                codebook + entropy-coded positions and indices)
compressor.py   compress() / compress_model(): the orchestration and the saved directory

    from fastserve.compress import compress
    result = compress("runs/small/model", "w4a16-awq", "builtin:stdlib", "runs/small-awq")
    result = compress("runs/small/model", "2of4-sparsegpt", "builtin:stdlib", "runs/small-24")
    result = compress("runs/small/model", "struct30", "builtin:stdlib", "runs/small-s30")
    result = compress("runs/small/model", "deep-compression", "builtin:stdlib", "runs/small-dc")
"""

from fastserve.compress.compressor import CompressResult, compress, compress_model
from fastserve.compress.recipe import (
    PRESETS,
    SHARING_PRESETS,
    SPARSE_PRESETS,
    STRUCTURED_PRESETS,
    Recipe,
)

__all__ = [
    "PRESETS",
    "SHARING_PRESETS",
    "SPARSE_PRESETS",
    "STRUCTURED_PRESETS",
    "CompressResult",
    "Recipe",
    "compress",
    "compress_model",
]
