"""Compression records: what config.json says about a compressed model, and how each kind of
record is saved and rebuilt. One registry (`RECORD_KINDS`) so that save_model and load_model
treat every kind the same way.

    config.json key        runtime module                       stored tensors
    quantization_config    QuantLinear (model/quantized.py)     weight_packed, weight_scale, ...
    sparsity_config        nn.Linear, dense weight rebuilt       shape, compressed, bitmask,
                           at load (model/sparse.py)             row_offsets (sparse-bitmask)
    weight_sharing_config  nn.Linear / nn.Embedding, dense        weight_shape, weight_codebook,
                           weight decoded at load                weight_positions, ...
                           (model/shared.py)                     (deep-compression)

A kind is an object with these steps (`RecordKind`); load_model runs them in this order:

    record = kind.read(value, config_path)          check the config.json entry
    fixed = kind.build(model, record, dtype, path)  swap runtime modules into the meta model;
                                                    returns the stored tensors that keep their
                                                    dtype (ints, float32 scales)
    decoder = kind.decoder(record, path)            stored tensors -> module state tensors
    kind.check(model, record, path)                 once every tensor is in place

and save_model:  record = kind.make(model, given)  (None: the model has nothing of this kind),
tensors = kind.encode(tensors, record).

What this module does not know: how a model was compressed (fastserve.compress), the file layout
(checkpoint.py: shards, names, dtypes of the dense tensors).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fastserve.errors import CheckpointError, ConfigError
from fastserve.model.quantized import QuantLinear, QuantScheme, quantization_modules, replace_linear
from fastserve.model.shared import (
    DEEP_FORMAT,
    DEEP_PARTS,
    MAX_BITS,
    PartError,
    deep_compress,
    deep_decompress,
    is_shared,
    shared_modules,
)
from fastserve.model.sparse import (
    BITMASK_FORMAT,
    BITMASK_PARTS,
    bitmask_compress,
    bitmask_decompress,
    nm_violations,
    parse_structure,
)

QUANT_METHOD = "fastserve"
QUANT_FORMAT_VERSION = 1
SPARSE_FORMAT_VERSION = 1
SHARE_FORMAT_VERSION = 1
# A sparse module whose tensors another record stores (a QuantLinear, a weight-shared linear).
DENSE_FORMAT = "dense"


class TensorDecoder(Protocol):
    """Turns the stored tensors a record owns into the module tensors they stand for."""

    def claims(self, name: str) -> bool: ...  # this stored tensor is one of the record's parts

    def feed(self, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]: ...  # decoded, if any

    def finish(self) -> None: ...  # CheckpointError when a part never came


class RecordKind(Protocol):
    key: str  # the config.json entry

    def make(self, model: nn.Module, given: dict[str, Any] | None) -> dict[str, Any] | None: ...

    def encode(self, tensors: dict[str, Tensor], record: dict[str, Any]) -> dict[str, Tensor]: ...

    def read(self, value: Any, config_path: Path) -> dict[str, Any]: ...

    def build(
        self, model: nn.Module, record: dict[str, Any], dtype: torch.dtype, path: Path
    ) -> dict[str, torch.dtype]: ...

    def decoder(self, record: dict[str, Any], path: Path) -> TensorDecoder | None: ...

    def check(self, model: nn.Module, record: dict[str, Any], path: Path) -> None: ...


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# ---- quantization_config -------------------------------------------------------------------------

_QUANT_RESERVED = ("quant_method", "format_version", "modules")


class QuantRecord:
    """quantization_config: {"quant_method": "fastserve", "format_version": 1, ...what the
    compressor describes..., "modules": {name: QuantScheme.to_dict()}} -> QuantLinear modules."""

    key = "quantization_config"

    def make(self, model: nn.Module, given: dict[str, Any] | None) -> dict[str, Any] | None:
        modules = quantization_modules(model)
        if not modules:
            if given is not None:
                raise ConfigError("quantization_config was given but the model has no QuantLinear")
            return None
        given = dict(given or {})
        clash = [k for k in _QUANT_RESERVED if k in given]
        if clash:
            raise ConfigError(f"quantization_config must not set {clash}: save_model writes them")
        return {
            "quant_method": QUANT_METHOD,
            "format_version": QUANT_FORMAT_VERSION,
            **given,
            "modules": {name: scheme.to_dict() for name, scheme in modules.items()},
        }

    def encode(self, tensors: dict[str, Tensor], record: dict[str, Any]) -> dict[str, Tensor]:
        return tensors  # QuantLinear buffers are stored as they are

    def read(self, value: Any, config_path: Path) -> dict[str, Any]:
        where = f"quantization_config in {config_path}"
        modules = _check_header(value, where, "quant_method", QUANT_METHOD, QUANT_FORMAT_VERSION)
        for name, scheme in modules.items():
            try:
                QuantScheme.from_dict(scheme)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"quantized module {name!r} in {config_path}: {e}") from e
        return value

    def build(
        self, model: nn.Module, record: dict[str, Any], dtype: torch.dtype, path: Path
    ) -> dict[str, torch.dtype]:
        """An empty (meta) QuantLinear in place of each listed nn.Linear."""
        for name, d in record["modules"].items():
            linear = _module(model, name)
            if not isinstance(linear, nn.Linear):
                raise CheckpointError(f"quantized module {name!r} in {path} is not a linear layer")
            try:
                qlin = QuantLinear(
                    linear.in_features,
                    linear.out_features,
                    QuantScheme.from_dict(d),
                    bias=linear.bias is not None,
                    dtype=dtype,
                    device="meta",
                )
                replace_linear(model, name, qlin)
            except ValueError as e:
                raise CheckpointError(f"quantized module {name!r} in {path}: {e}") from e
        # Quantized buffers keep their stored dtype (ints, float32 scales); the rest is cast.
        return {
            f"{name}.{b}": t.dtype
            for name, m in model.named_modules()
            if isinstance(m, QuantLinear)
            for b, t in m.named_buffers(recurse=False)
            if b != "bias"
        }

    def decoder(self, record: dict[str, Any], path: Path) -> TensorDecoder | None:
        return None

    def check(self, model: nn.Module, record: dict[str, Any], path: Path) -> None:
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                try:
                    m.check_tensors()
                except ValueError as e:
                    raise CheckpointError(f"quantized module {name!r} in {path}: {e}") from e


# ---- sparsity_config -----------------------------------------------------------------------------

_SPARSE_RESERVED = ("format", "format_version", "global_sparsity", "sparsity_structure")


def _weight(module: nn.Module) -> Tensor:
    return module.dequantize() if isinstance(module, QuantLinear) else module.weight.detach()


def _distinct(values: Iterable[Any]) -> Any:
    unique = list(dict.fromkeys(values))
    return unique[0] if len(unique) == 1 else unique


class SparseRecord:
    """sparsity_config: {"format": "sparse-bitmask", "format_version": 1, "sparsity_structure",
    "global_sparsity", ...what the compressor describes (method, recipe)..., "modules": {name:
    {"format", "structure", "sparsity"}}}. A float linear is stored as bitmask parts and rebuilt
    as a dense nn.Linear at load; a quantized one ("format": "dense") keeps its QuantLinear
    tensors (zeros stay zero codes) and a weight-shared one ("format": "dense") its
    weight_sharing_config parts (zeros stay out of the positions): the record only describes
    them.

    save_model's `sparsity_config` names the pruned modules, {"modules": {name: {"structure":
    "2:4" | "unstructured"}}, ...}: a pruned weight is a dense tensor with zeros and cannot
    announce itself as a QuantLinear does. Their sparsity is measured; a weight whose zeros break
    its N:M structure is a ConfigError."""

    key = "sparsity_config"

    def make(self, model: nn.Module, given: dict[str, Any] | None) -> dict[str, Any] | None:
        if given is None:
            return None
        given = dict(given)
        clash = [k for k in _SPARSE_RESERVED if k in given]
        if clash:
            raise ConfigError(f"sparsity_config must not set {clash}: save_model writes them")
        wanted = given.pop("modules", None)
        if not isinstance(wanted, dict) or not wanted:
            raise ConfigError("sparsity_config must name its pruned modules in 'modules'")
        modules, zeros, total = {}, 0, 0
        for name, entry in wanted.items():
            module = _module(model, name)
            if not isinstance(module, (nn.Linear, QuantLinear)) or name == "lm_head":
                raise ConfigError(f"sparse module {name!r} is not a decoder linear layer")
            structure = entry.get("structure") if isinstance(entry, dict) else None
            try:
                nm = parse_structure(structure)
            except ValueError as e:
                raise ConfigError(f"sparse module {name!r}: {e}") from None
            w = _weight(module)
            if nm is not None and nm_violations(w != 0, *nm):
                raise ConfigError(f"sparse module {name!r} does not have its {structure} pattern")
            num_zeros = int((w == 0).sum())
            zeros, total = zeros + num_zeros, total + w.numel()
            stored_elsewhere = isinstance(module, QuantLinear) or is_shared(module)
            modules[name] = {
                "format": DENSE_FORMAT if stored_elsewhere else BITMASK_FORMAT,
                "structure": structure,
                "sparsity": round(num_zeros / w.numel(), 6),
            }
        return {
            "format": BITMASK_FORMAT,
            "format_version": SPARSE_FORMAT_VERSION,
            "sparsity_structure": _distinct(m["structure"] for m in modules.values()),
            "global_sparsity": round(zeros / total, 6),
            **given,
            "modules": modules,
        }

    def encode(self, tensors: dict[str, Tensor], record: dict[str, Any]) -> dict[str, Tensor]:
        """Each bitmask module's `<name>.weight` replaced, in place, by its parts."""
        bitmask = {n for n, m in record["modules"].items() if m["format"] == BITMASK_FORMAT}
        out: dict[str, Tensor] = {}
        for name, t in tensors.items():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in bitmask:
                parts = bitmask_compress(t)
                out.update({f"{module}.{p}": parts[p] for p in BITMASK_PARTS})
            else:
                out[name] = t
        return out

    def read(self, value: Any, config_path: Path) -> dict[str, Any]:
        where = f"sparsity_config in {config_path}"
        modules = _check_header(value, where, "format", BITMASK_FORMAT, SPARSE_FORMAT_VERSION)
        for name, m in modules.items():
            ok = isinstance(m, dict) and m.get("format") in (BITMASK_FORMAT, DENSE_FORMAT)
            try:
                parse_structure(m.get("structure") if ok else None)
            except ValueError:
                ok = False
            if not ok:
                raise CheckpointError(
                    f"sparse module {name!r} in {config_path} needs a format ({BITMASK_FORMAT} "
                    f"or {DENSE_FORMAT}) and a structure (unstructured or N:M), got {m!r}"
                )
        return value

    def build(
        self, model: nn.Module, record: dict[str, Any], dtype: torch.dtype, path: Path
    ) -> dict[str, torch.dtype]:
        for name, m in record["modules"].items():
            module = _module(model, name)
            kinds = (nn.Linear,) if m["format"] == BITMASK_FORMAT else (nn.Linear, QuantLinear)
            if not isinstance(module, kinds) or name == "lm_head":
                what = "a float linear layer" if m["format"] == BITMASK_FORMAT else "a linear layer"
                raise CheckpointError(f"sparse module {name!r} in {path} is not {what}")
        return {}  # the rebuilt weights take the model dtype like any dense weight

    def decoder(self, record: dict[str, Any], path: Path) -> TensorDecoder | None:
        return _BitmaskDecoder(record, path)

    def check(self, model: nn.Module, record: dict[str, Any], path: Path) -> None:
        pass  # the bitmask decoder checked the parts and the N:M structure


class _PartsDecoder:
    """Collects each module's stored parts (they may sit in different shards) and yields
    `<name>.weight` once all have arrived; a subclass names the parts and decodes them."""

    parts: tuple[str, ...]
    stored_as: str  # "as a bitmask": how a module's weight is stored, for the error message

    def __init__(self, modules, path: Path) -> None:
        self.path = path
        self.modules = frozenset(modules)  # claimed even once decoded: a repeat is an error
        self.pending: dict[str, dict[str, Tensor]] = {n: {} for n in modules}

    def _split(self, name: str) -> tuple[str, str] | None:
        module, _, part = name.rpartition(".")
        if module in self.modules and (part in self.parts or part == "weight"):
            return module, part
        return None

    def claims(self, name: str) -> bool:
        return self._split(name) is not None

    def feed(self, name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        module, part = self._split(name)
        if part == "weight":
            raise CheckpointError(
                f"unexpected tensor {name!r} in {self.path}: the module is stored {self.stored_as}"
            )
        parts = self.pending.get(module)
        if parts is None or part in parts:
            raise CheckpointError(f"tensor {name!r} appears twice in {self.path}")
        parts[part] = tensor
        if len(parts) < len(self.parts):
            return []
        weight = self._decode(module, parts)
        del self.pending[module]
        return [(f"{module}.weight", weight)]

    def _decode(self, module: str, parts: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def finish(self) -> None:
        for module, parts in self.pending.items():
            missing = next(p for p in self.parts if p not in parts)
            raise CheckpointError(f"tensor '{module}.{missing}' is missing from {self.path}")


class _BitmaskDecoder(_PartsDecoder):
    parts, stored_as = BITMASK_PARTS, "as a bitmask"

    def __init__(self, record: dict[str, Any], path: Path) -> None:
        self.structures = {
            n: parse_structure(m["structure"])
            for n, m in record["modules"].items()
            if m["format"] == BITMASK_FORMAT
        }
        super().__init__(self.structures, path)

    def _decode(self, module: str, parts: dict[str, Tensor]) -> Tensor:
        try:
            weight = bitmask_decompress(**parts)
        except ValueError as e:
            raise CheckpointError(f"sparse module {module!r} in {self.path}: {e}") from e
        nm = self.structures[module]
        if nm is not None and nm_violations(weight != 0, *nm):
            n, m = nm
            raise CheckpointError(
                f"sparse module {module!r} in {self.path} breaks its {n}:{m} structure"
            )
        return weight


# ---- weight_sharing_config -----------------------------------------------------------------------


def _check_bits(name: str, entry: Any, where: str) -> int:
    bits = entry.get("bits") if isinstance(entry, dict) else None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise CheckpointError(
            f"weight-shared module {name!r} in {where} needs bits in [1, {MAX_BITS}], got {entry!r}"
        )
    return bits


class ShareRecord:
    """weight_sharing_config: {"format": "deep-compression", "format_version": 1, "bits",
    "modules": {name: {"bits": b}}}. A weight-shared linear or embedding (SharedLinear /
    SharedEmbedding: the type announces it, as a QuantLinear's does) is stored as Deep
    Compression parts (model/shared.py) and decoded at load into a plain nn.Linear /
    nn.Embedding weight. `bits` is the modules' one width, or the list of the distinct ones."""

    key = "weight_sharing_config"

    def make(self, model: nn.Module, given: dict[str, Any] | None) -> dict[str, Any] | None:
        modules = shared_modules(model)
        if given is not None:
            raise ConfigError("weight_sharing_config is made from the model's shared modules")
        if not modules:
            return None
        return {
            "format": DEEP_FORMAT,
            "format_version": SHARE_FORMAT_VERSION,
            "bits": _distinct(modules.values()),
            "modules": {name: {"bits": bits} for name, bits in modules.items()},
        }

    def encode(self, tensors: dict[str, Tensor], record: dict[str, Any]) -> dict[str, Tensor]:
        """Each listed module's `<name>.weight` replaced, in place, by its parts."""
        bits = {name: m["bits"] for name, m in record["modules"].items()}
        out: dict[str, Tensor] = {}
        for name, t in tensors.items():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in bits:
                try:
                    parts = deep_compress(t, bits[module])
                except ValueError as e:
                    raise ConfigError(f"weight-shared module {module!r}: {e}") from None
                out.update({f"{module}.{p}": parts[p] for p in DEEP_PARTS})
            else:
                out[name] = t
        return out

    def read(self, value: Any, config_path: Path) -> dict[str, Any]:
        where = f"weight_sharing_config in {config_path}"
        modules = _check_header(value, where, "format", DEEP_FORMAT, SHARE_FORMAT_VERSION)
        for name, entry in modules.items():
            _check_bits(name, entry, str(config_path))
        return value

    def build(
        self, model: nn.Module, record: dict[str, Any], dtype: torch.dtype, path: Path
    ) -> dict[str, torch.dtype]:
        for name in record["modules"]:
            if not isinstance(_module(model, name), (nn.Linear, nn.Embedding)):
                raise CheckpointError(
                    f"weight-shared module {name!r} in {path} is not a float linear or embedding"
                )
        return {}  # the decoded weights take the model dtype like any dense weight

    def decoder(self, record: dict[str, Any], path: Path) -> TensorDecoder | None:
        return _SharedDecoder(record, path)

    def check(self, model: nn.Module, record: dict[str, Any], path: Path) -> None:
        pass  # the decoder checked every part


class _SharedDecoder(_PartsDecoder):
    parts, stored_as = DEEP_PARTS, "deep-compressed"

    def __init__(self, record: dict[str, Any], path: Path) -> None:
        self.bits = {name: m["bits"] for name, m in record["modules"].items()}
        super().__init__(self.bits, path)

    def _decode(self, module: str, parts: dict[str, Tensor]) -> Tensor:
        try:
            return deep_decompress(parts, self.bits[module])
        except PartError as e:
            raise CheckpointError(f"tensor '{module}.{e.part}' in {self.path}: {e}") from e


# Applied in this order: quantized modules are swapped in before the sparse record checks them;
# the sparse record leaves weight-shared modules to the last one.
RECORD_KINDS: tuple[RecordKind, ...] = (QuantRecord(), SparseRecord(), ShareRecord())


def _check_header(value: Any, where: str, kind_key: str, kind: str, version: int) -> dict:
    """The common head of a saved record: a JSON object of the expected kind and format_version
    that lists its modules; returns the modules."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    if value.get(kind_key) != kind:
        raise CheckpointError(
            f"{where} has {kind_key} {value.get(kind_key)!r}; FastServe reads {kind!r} only"
        )
    if value.get("format_version") != version:
        raise CheckpointError(
            f"{where} has format_version {value.get('format_version')!r}; this FastServe reads "
            f"version {version}"
        )
    modules = value.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{where} lists no modules")
    return modules
