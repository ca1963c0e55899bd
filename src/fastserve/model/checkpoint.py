"""Model directories in HF layout: save and load, safetensors only.

    save_model(model, "out/model", tokenizer=tok)       # atomic; loads in transformers unchanged
    model = load_model("out/model", device="cuda", dtype="bfloat16")

A model dir holds `config.json` (ModelConfig.to_hf_dict), `model.safetensors` or shards
`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`, `generation_config.json` and,
when a tokenizer is given, whatever its `save_pretrained` writes. A tied lm_head is stored once, as
`model.embed_tokens.weight` (as HF does). Loading checks names and shapes before touching the
model, so a bad dir fails with one sentence naming the offending tensor.

A compressed model is saved with one config.json entry per kind of compression record
(records.py: `quantization_config` for QuantLinear modules, `sparsity_config` for pruned
linears stored as bitmasks). Loading builds the model on the meta device, lets each record swap
in its runtime modules (a QuantLinear per quantized linear), reads the tensors through each
record's decoder (bitmask parts -> a dense weight), checks names, shapes and the dtypes that must
match exactly (int tensors, float32 scales), then lets each record check the result.

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
from fastserve.model.records import RECORD_KINDS, QuantRecord
from fastserve.utils.io import atomic_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Buffers some HF checkpoints carry that this model recomputes instead of storing.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
    sparsity_config: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as an HF model dir at `path` (atomically replacing any existing dir).

    `generation_config` entries override the defaults (bos/eos/pad ids from the model config).
    `quantization_config` (method, bits, group_size, ... as the compressor describes them) is
    merged into config.json's quantization_config, which is written whenever the model holds
    QuantLinear modules (ConfigError when it is given for a model without any).
    `sparsity_config` names the pruned linears ({"modules": {name: {"structure": "2:4"}}, plus
    method, recipe, ...); their weights are stored as bitmasks (records.SparseRecord). Returns
    the path.
    """
    if max_shard_size_bytes <= 0:
        raise ConfigError(f"max_shard_size_bytes must be positive, got {max_shard_size_bytes}")
    given = {"quantization_config": quantization_config, "sparsity_config": sparsity_config}
    records = {kind.key: kind.make(model, given.get(kind.key)) for kind in RECORD_KINDS}
    config = model.config.replace(torch_dtype=_dtype_name(model.dtype))
    tensors = {
        name: t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    for kind in RECORD_KINDS:
        if records[kind.key] is not None:
            tensors = kind.encode(tensors, records[kind.key])
    shards = _plan_shards(tensors, max_shard_size_bytes)
    gen = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        **(generation_config or {}),
    }
    with atomic_dir(path) as tmp:
        hf_config = {**config.to_hf_dict(), "fastserve_version": __version__}
        hf_config.update({key: record for key, record in records.items() if record is not None})
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


def _read_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    load_config(path)  # the same existence / JSON / architecture checks
    return json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))


def read_records(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The compression records of config.json that are present ({key: checked record}, in
    RECORD_KINDS order; empty for a dense dir). CheckpointError for a record FastServe cannot
    load (a foreign method or format, another format_version, invalid module entries)."""
    d = _read_config_dict(path)
    config_path = Path(path) / CONFIG_FILE
    return {
        kind.key: kind.read(d[kind.key], config_path)
        for kind in RECORD_KINDS
        if d.get(kind.key) is not None
    }


def read_quantization_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """config.json's quantization_config (None for a dense dir), checked: CheckpointError when it
    is not a FastServe one of a known format version or its module schemes are invalid."""
    qc = _read_config_dict(path).get("quantization_config")
    return None if qc is None else QuantRecord().read(qc, Path(path) / CONFIG_FILE)


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
    records = read_records(path)
    target_dtype = parse_dtype(dtype, config.torch_dtype)
    files = weight_files(path)
    kinds = [kind for kind in RECORD_KINDS if kind.key in records]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    fixed_dtypes: dict[str, torch.dtype] = {}  # stored tensors that keep their dtype exactly
    for kind in kinds:
        fixed_dtypes.update(kind.build(model, records[kind.key], target_dtype, Path(path)))
    decoders = [d for kind in kinds if (d := kind.decoder(records[kind.key], Path(path)))]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # loaded through embed_tokens

    state: dict[str, torch.Tensor] = {}

    def take(name: str, tensor: torch.Tensor, f: Path) -> None:
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} in {f}")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"tensor {name!r} in {f} has shape {tuple(tensor.shape)}, expected {expected[name]}"
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

    for f in files:
        for name, tensor in iter_safetensors(f):
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue  # tied: the head is the embedding, as HF treats it
            decoder = next((d for d in decoders if d.claims(name)), None)
            if decoder is None:
                take(name, tensor, f)
            else:
                for decoded_name, decoded in decoder.feed(name, tensor):
                    take(decoded_name, decoded, f)
    for decoder in decoders:
        decoder.finish()
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {path}{more}")

    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for kind in kinds:
        kind.check(model, records[kind.key], Path(path))
    model.config = config.replace(torch_dtype=_dtype_name(target_dtype))
    model.model.config = model.config
    return model.eval()
