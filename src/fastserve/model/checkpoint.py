"""Model directories in HF layout: save and load, safetensors only.

    save_model(model, "out/model", tokenizer=tok)       # atomic; loads in transformers unchanged
    model = load_model("out/model", device="cuda", dtype="bfloat16")

A model dir holds `config.json` (ModelConfig.to_hf_dict), `model.safetensors` or shards
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`, `generation_config.json` and,
when a tokenizer is given, whatever its `save_pretrained` writes. A tied lm_head is stored once, as
`model.embed_tokens.weight` (as HF does). Loading checks names and shapes before touching the
model, so a bad dir fails with one sentence naming the offending tensor.

A model holding QuantLinear modules is saved as a compressed dir: `config.json` gets a
`quantization_config` ({"quant_method": "fastserve", "format_version": 1, ..., "modules":
{name: QuantScheme.to_dict()}}) and the packed int tensors are stored as they are. Loading such a
dir builds the model on the meta device, swaps a QuantLinear in for every listed module, then
loads the tensors (int tensors and float32 scales keep their dtypes; they must match exactly).

What it does not know: pickled weights (`.bin`, `.pt`: refused, never unpickled), how a model was
quantized (fastserve.compress), tokenizers (duck-typed `save_pretrained`), hub ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastserve import __version__
from fastserve.errors import CheckpointError, ConfigError
from fastserve.model.config import ModelConfig
from fastserve.model.llama import LlamaForCausalLM
from fastserve.model.quantized import QuantLinear, QuantScheme, quantization_modules, replace_linear
from fastserve.utils.io import atomic_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Buffers some HF checkpoints carry that this model recomputes instead of storing.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

QUANT_METHOD = "fastserve"
QUANT_FORMAT_VERSION = 1
_QUANT_RESERVED = ("quant_method", "format_version", "modules")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: torch.dtype | str | None, default: str) -> torch.dtype:
    """`torch.bfloat16`, "bfloat16", "bf16", None (-> default) -> a torch floating dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}.get(
        dtype or default, dtype or default
    )
    result = getattr(torch, str(name), None)
    if not isinstance(result, torch.dtype) or not result.is_floating_point:
        raise ConfigError(f"unsupported dtype {dtype!r} (use float32, bfloat16 or float16)")
    return result


# ---- save ----------------------------------------------------------------------------------------


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, order-preserving split; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_model(
    model: LlamaForCausalLM,
    path: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_size_bytes: int = 2 * 1024**3,
    generation_config: dict[str, Any] | None = None,
    quantization_config: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as an HF model dir at `path` (atomically replacing any existing dir).

    `generation_config` entries override the defaults (bos/eos/pad ids from the model config).
    `quantization_config` (method, bits, group_size, ... as the compressor describes them) is
    merged into config.json's quantization_config, which is written whenever the model holds
    QuantLinear modules (ConfigError when it is given for a model without any). Returns the path.
    """
    if max_shard_size_bytes <= 0:
        raise ConfigError(f"max_shard_size_bytes must be positive, got {max_shard_size_bytes}")
    quant_record = _quantization_record(model, quantization_config)
    config = model.config.replace(torch_dtype=_dtype_name(model.dtype))
    tensors = {
        name: t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    shards = _plan_shards(tensors, max_shard_size_bytes)
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        **(generation_config or {}),
    }
    with atomic_dir(path) as tmp:
        hf_config = {**config.to_hf_dict(), "fastserve_version": __version__}
        if quant_record is not None:
            hf_config["quantization_config"] = quant_record
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        (tmp / GENERATION_CONFIG_FILE).write_text(
            json.dumps(gen, indent=2) + "\n", encoding="utf-8"
        )
        metadata = {"format": "pt"}  # transformers refuses safetensors files without it
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_FILE), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=metadata)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)


def _quantization_record(
    model: LlamaForCausalLM, extra: dict[str, Any] | None
) -> dict[str, Any] | None:
    modules = quantization_modules(model)
    if not modules:
        if extra is not None:
            raise ConfigError("quantization_config was given but the model has no QuantLinear")
        return None
    extra = dict(extra or {})
    clash = [k for k in _QUANT_RESERVED if k in extra]
    if clash:
        raise ConfigError(f"quantization_config must not set {clash}: save_model writes them")
    return {
        "quant_method": QUANT_METHOD,
        "format_version": QUANT_FORMAT_VERSION,
        **extra,
        "modules": {name: scheme.to_dict() for name, scheme in modules.items()},
    }


# ---- load ----------------------------------------------------------------------------------------


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model dir, in index order; CheckpointError when there are none."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read weight index {index}: {e}") from e
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"weight shard {f.name} listed in {index} is missing")
        return files
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        raise CheckpointError(
            f"{path} holds only pickled weights (.bin/.pt); FastServe loads safetensors only"
        )
    raise CheckpointError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path}")


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) for every tensor of one .safetensors file, one at a time."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file, or of every shard of a model dir, on CPU."""
    path = Path(path)
    files = weight_files(path) if path.is_dir() else [path]
    return {name: t for f in files for name, t in iter_safetensors(f)}


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model dir (ConfigError for unsupported architectures)."""
    config_path = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a model directory: it has no {CONFIG_FILE}")
    try:
        d = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    return ModelConfig.from_hf_dict(d)


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """config.json's quantization_config (None for a dense dir), checked: CheckpointError when it
    is not a FastServe one of a known format version or its module schemes are invalid."""
    config_path = Path(path) / CONFIG_FILE
    load_config(path)  # the same existence / JSON / architecture checks
    qc = json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"quantization_config in {config_path} is not a JSON object")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(
            f"{config_path} uses quant_method {method!r}; FastServe loads {QUANT_METHOD!r} only"
        )
    if qc.get("format_version") != QUANT_FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has quantization format_version {qc.get('format_version')!r}; "
            f"this FastServe reads version {QUANT_FORMAT_VERSION}"
        )
    modules = qc.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"quantization_config in {config_path} lists no modules")
    for name, scheme in modules.items():
        try:
            QuantScheme.from_dict(scheme)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"quantized module {name!r} in {config_path}: {e}") from e
    return qc


def _swap_quantized(
    model: LlamaForCausalLM, modules: dict[str, Any], dtype: torch.dtype, path: Path
) -> None:
    """Replace each listed nn.Linear of the meta model by an empty (meta) QuantLinear."""
    for name, d in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, torch.nn.Linear):
            raise CheckpointError(f"quantized module {name!r} in {path} is not a linear layer")
        scheme = QuantScheme.from_dict(d)
        try:
            qlin = QuantLinear(
                linear.in_features,
                linear.out_features,
                scheme,
                bias=linear.bias is not None,
                dtype=dtype,
                device="meta",
            )
            replace_linear(model, name, qlin)
        except ValueError as e:
            raise CheckpointError(f"quantized module {name!r} in {path}: {e}") from e


def load_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LlamaForCausalLM:
    """Load an HF Llama / Mistral / Qwen2 model dir; eval mode, `.config` set.

    `dtype` None means the config's torch_dtype. The model is built on the meta device and the
    checked tensors are assigned directly, so peak memory is one copy of the weights.
    """
    config = load_config(path)
    quant = read_quantization_config(path)
    target_dtype = parse_dtype(dtype, config.torch_dtype)
    files = weight_files(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if quant is not None:
        _swap_quantized(model, quant["modules"], target_dtype, Path(path))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # loaded through embed_tokens
    # Quantized buffers keep their stored dtype (ints, float32 scales); the rest is cast.
    fixed_dtypes = {
        f"{name}.{b}": t.dtype
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for b, t in m.named_buffers(recurse=False)
        if b != "bias"
    }

    state: dict[str, torch.Tensor] = {}
    for f in files:
        for name, tensor in iter_safetensors(f):
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue  # tied: the head is the embedding, as HF treats it
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {name!r} in {f}")
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"tensor {name!r} in {f} has shape {tuple(tensor.shape)}, "
                    f"expected {expected[name]}"
                )
            if name in fixed_dtypes:
                if tensor.dtype != fixed_dtypes[name]:
                    raise CheckpointError(
                        f"tensor {name!r} in {f} has dtype {_dtype_name(tensor.dtype)}, expected "
                        f"{_dtype_name(fixed_dtypes[name])}"
                    )
                state[name] = tensor.to(device=device)
            else:
                state[name] = tensor.to(device=device, dtype=target_dtype)
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {path}{more}")

    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            try:
                m.check_tensors()
            except ValueError as e:
                raise CheckpointError(f"quantized module {name!r} in {path}: {e}") from e
    model.config = config.replace(torch_dtype=_dtype_name(target_dtype))
    model.model.config = model.config
    return model.eval()
