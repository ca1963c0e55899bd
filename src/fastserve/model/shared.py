"""Weight-shared tensors and their Deep Compression storage (Han et al. 2016): a weight whose
nonzero values take at most 2^bits distinct values (k-means weight sharing, possibly after
pruning) stored as a codebook plus two entropy-coded streams, tensors in and tensors out.

    parts = deep_compress(w, bits=4)     # {"weight_shape", "weight_codebook", ...}: DEEP_PARTS
    w2 = deep_decompress(parts, bits=4)  # == w as float32, bit for bit
    mark_shared(model, "model.layers.0.mlp.up_proj", bits=4)   # the module announces itself
    shared_modules(model)                # {"model.layers.0.mlp.up_proj": 4, ...}

A weight-shared module is a `SharedLinear` / `SharedEmbedding`: it computes exactly as
nn.Linear / nn.Embedding (same parameters, same state_dict), and its type tells save_model to
store it deep-compressed (records.ShareRecord), as a QuantLinear's type announces its record.
Loading gives back plain nn.Linear / nn.Embedding weights (decoded at load).

Parts of one weight (names under the module prefix, e.g. `model.layers.0.mlp.up_proj.`):

    weight_shape            int64 [ndim]   the dense shape
    weight_codebook         float32 [K]    the distinct nonzero values, strictly increasing,
                                           K <= 2^bits (every float16/bfloat16 value is exact)
    weight_position_counts  uint32 [16]    how often each position symbol occurs
    weight_positions        uint32 [*]     the position symbols, ANS-coded
    weight_index_counts     uint32 [K]     how often each codebook index occurs (sum = nnz)
    weight_indices          uint32 [*]     the codebook index of every nonzero, in position
                                           order (row-major), ANS-coded

Position symbols: the row-major flattened bitmask (1 = nonzero) cut into groups of 4 weights,
symbol = sum_j bit_(4i+j) << j, the last group padded with zeros (groups run across rows).

    weights:  0.3 0 0 -0.1 | 0 0.2 0.2 0 | ...     ->  symbols 0b1001 = 9, 0b0110 = 6, ...

Four weights per symbol capture a 2:4 pattern exactly (6 of 16 symbols: 0.65 bits per weight
instead of 1) and cost nothing for independent positions at any sparsity; they measured below
position gaps everywhere (docs/compress.md, "Deep Compression").

Coder: constriction's `stack.AnsCoder` (32-bit words, 64-bit state) with
`model.Categorical(counts / sum(counts), perfect=False)` (24-bit fixed point), the stream's own
symbol counts as the model, so the decoder rebuilds the same model from the stored counts. A
stream whose counts have at most one nonzero entry carries no information and is empty. The
decoder checks that each stream decodes to exactly its stored counts and leaves the coder empty,
so a corrupt or truncated stream is an error, not wrong weights.

What it does not know: how the values were chosen (fastserve.compress.share), which modules are
stored this way (records.py), files (checkpoint.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

DEEP_FORMAT = "deep-compression"
DEEP_PARTS = (
    "weight_shape",
    "weight_codebook",
    "weight_position_counts",
    "weight_positions",
    "weight_index_counts",
    "weight_indices",
)
MAX_BITS = 8
GROUP = 4  # weights per position symbol
_GROUP_BITS = np.array([1 << j for j in range(GROUP)], dtype=np.int64)


class PartError(ValueError):
    """A stored part that does not decode; `part` names it (one of DEEP_PARTS)."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


# ---- the marker modules --------------------------------------------------------------------------


class SharedLinear(nn.Linear):
    """An nn.Linear whose weight is weight-shared at `bits`; computes as nn.Linear."""

    bits: int = 4


class SharedEmbedding(nn.Embedding):
    """An nn.Embedding whose weight is weight-shared at `bits`; computes as nn.Embedding."""

    bits: int = 4


def _shared_copy(module: nn.Module, bits: int) -> nn.Module:
    """A SharedLinear / SharedEmbedding holding the very parameters of `module` (ties kept)."""
    if isinstance(module, nn.Linear):
        new = SharedLinear(module.in_features, module.out_features, bias=False, device="meta")
        new.bias = module.bias
    elif isinstance(module, nn.Embedding):
        new = SharedEmbedding(
            module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta"
        )
    else:
        raise ValueError(f"only linear and embedding layers can be weight-shared, not {module}")
    new.weight = module.weight
    new.bits = bits
    return new.train(module.training)


def mark_shared(model: nn.Module, name: str, bits: int) -> nn.Module:
    """Swap the linear or embedding at dotted `name` for its Shared* twin (same parameters)."""
    module = model.get_submodule(name)
    if isinstance(module, (SharedLinear, SharedEmbedding)):
        module.bits = bits
        return module
    new = _shared_copy(module, bits)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return new


def is_shared(module: nn.Module) -> bool:
    return isinstance(module, (SharedLinear, SharedEmbedding))


def shared_modules(model: nn.Module) -> dict[str, int]:
    """Full name -> bits of every weight-shared module, in module order."""
    return {n: m.bits for n, m in model.named_modules() if is_shared(m)}


# ---- the entropy coder ---------------------------------------------------------------------------


def _categorical(counts: np.ndarray):
    import constriction

    probabilities = counts.astype(np.float64) / float(counts.sum())
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def _informative(counts: np.ndarray) -> bool:
    return int((counts > 0).sum()) > 1


def encode_symbols(symbols: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Symbols in [0, len(counts)) -> uint32 ANS words (empty when only one symbol occurs)."""
    import constriction

    if not _informative(counts):
        return np.zeros(0, dtype=np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), _categorical(counts))
    return coder.get_compressed().astype(np.uint32)


def decode_symbols(words: np.ndarray, counts: np.ndarray, part: str) -> np.ndarray:
    """The sum(counts) symbols of an encode_symbols stream; PartError unless they decode to
    exactly `counts` and use the whole stream."""
    import constriction

    num = int(counts.sum())
    if not _informative(counts):
        if words.size:
            raise PartError(part, f"holds {words.size} words where its counts need none")
        return np.full(num, int(np.argmax(counts)) if num else 0, dtype=np.int64)
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        symbols = coder.decode(_categorical(counts), num).astype(np.int64)
        used_all = coder.is_empty()
    except (ValueError, RuntimeError, OverflowError) as e:
        raise PartError(part, f"does not decode (corrupt or truncated): {e}") from None
    if not used_all or not np.array_equal(np.bincount(symbols, minlength=counts.size), counts):
        raise PartError(part, "does not decode to its symbol counts (corrupt or truncated)")
    return symbols


# ---- weight <-> parts ----------------------------------------------------------------------------


def _counts(symbols: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(symbols, minlength=size).astype(np.uint32)


def deep_compress(weight: Tensor, bits: int) -> dict[str, Tensor]:
    """A weight-shared tensor -> its parts (module docstring); ValueError when it has more than
    2^bits distinct nonzero values or non-finite ones."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
    if not weight.dtype.is_floating_point or weight.dim() == 0:
        raise ValueError(
            f"expected a float tensor of 1 or more dims, got {weight.dtype} {weight.shape}"
        )
    flat = weight.detach().reshape(-1).to("cpu", torch.float32)
    if flat.numel() >= 2**32:
        raise ValueError(f"{flat.numel()} weights do not fit the uint32 counts")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("the weight holds non-finite values")
    kept = flat != 0
    codebook, indices = torch.unique(flat[kept], sorted=True, return_inverse=True)
    if codebook.numel() > 2**bits:
        raise ValueError(
            f"{codebook.numel()} distinct nonzero values do not fit {2**bits} centroids "
            f"({bits} bits): the weight is not weight-shared at {bits} bits"
        )
    mask = np.pad(kept.numpy(), (0, (-flat.numel()) % GROUP)).reshape(-1, GROUP)
    positions = (mask.astype(np.int64) * _GROUP_BITS).sum(axis=1)
    indices = indices.numpy().astype(np.int64)
    position_counts = _counts(positions, 1 << GROUP)
    index_counts = _counts(indices, codebook.numel())
    return {
        "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "weight_codebook": codebook.contiguous(),
        "weight_position_counts": torch.from_numpy(position_counts),
        "weight_positions": torch.from_numpy(encode_symbols(positions, position_counts)),
        "weight_index_counts": torch.from_numpy(index_counts),
        "weight_indices": torch.from_numpy(encode_symbols(indices, index_counts)),
    }


def _vector(parts: dict[str, Tensor], part: str, dtype: torch.dtype) -> np.ndarray:
    t = parts[part]
    if t.dtype != dtype or t.dim() != 1:
        raise PartError(part, f"must be a 1-D {dtype} tensor, got {t.dtype} {tuple(t.shape)}")
    return t.numpy()


def deep_decompress(parts: dict[str, Tensor], bits: int) -> Tensor:
    """The float32 weight of `parts` (DEEP_PARTS); PartError naming the part that does not fit."""
    missing = [p for p in DEEP_PARTS if p not in parts]
    if missing:
        raise PartError(missing[0], "is missing")  # (records.py: a part that never came)
    shape = [int(v) for v in _vector(parts, "weight_shape", torch.int64)]
    if not shape or min(shape) < 0:
        raise PartError("weight_shape", f"is not a shape: {shape}")
    numel = int(np.prod(shape))
    codebook = parts["weight_codebook"]
    _vector(parts, "weight_codebook", torch.float32)
    if codebook.numel() > 2**bits:
        raise PartError("weight_codebook", f"holds {codebook.numel()} values, more than 2^{bits}")
    ok = bool(torch.isfinite(codebook).all()) and not bool((codebook == 0).any())
    if not ok or bool((codebook[1:] <= codebook[:-1]).any()):
        raise PartError("weight_codebook", "must hold finite, nonzero, increasing values")
    position_counts = _vector(parts, "weight_position_counts", torch.uint32).astype(np.int64)
    index_counts = _vector(parts, "weight_index_counts", torch.uint32).astype(np.int64)
    num_groups = -(-numel // GROUP)
    if position_counts.size != 1 << GROUP or int(position_counts.sum()) != num_groups:
        raise PartError(
            "weight_position_counts", f"must be 16 counts summing to {num_groups} symbols"
        )
    if index_counts.size != codebook.numel():
        raise PartError(
            "weight_index_counts", f"must hold {codebook.numel()} counts (the codebook)"
        )

    positions = decode_symbols(
        _vector(parts, "weight_positions", torch.uint32), position_counts, "weight_positions"
    )
    mask = ((positions[:, None] >> np.arange(GROUP)) & 1).astype(bool).reshape(-1)
    if mask[numel:].any():
        raise PartError("weight_positions", "marks weights past the end of the tensor")
    mask = mask[:numel]
    if int(mask.sum()) != int(index_counts.sum()):
        raise PartError(
            "weight_index_counts",
            f"count {int(index_counts.sum())} nonzeros but the positions mark {int(mask.sum())}",
        )
    indices = decode_symbols(
        _vector(parts, "weight_indices", torch.uint32), index_counts, "weight_indices"
    )
    weight = torch.zeros(numel, dtype=torch.float32)
    weight[torch.from_numpy(mask)] = codebook[torch.from_numpy(indices)]
    return weight.reshape(shape)
