"""The Llama-family model: config, network, KV cache, quantized layers, sparse storage and
HF-layout checkpoints (compressed dirs rebuilt through the records of records.py).

Knows tensors and shapes only: no sampling (fastserve.generate), no scheduling (fastserve.engine).
"""

from fastserve.model.checkpoint import load_model, save_model
from fastserve.model.config import ModelConfig, parse_overrides, resolve_config
from fastserve.model.llama import KVCache, LlamaForCausalLM
from fastserve.model.quantized import (
    QuantLinear,
    QuantScheme,
    quantization_modules,
    quantize_model,
)

__all__ = [
    "KVCache",
    "LlamaForCausalLM",
    "ModelConfig",
    "QuantLinear",
    "QuantScheme",
    "load_model",
    "parse_overrides",
    "quantization_modules",
    "quantize_model",
    "resolve_config",
    "save_model",
]
