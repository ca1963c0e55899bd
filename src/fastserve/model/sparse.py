"""Sparse weights: N:M structure checks and the bitmask storage format (compressed-tensors'
`sparse-bitmask`), as tensors in and tensors out.

    parts = bitmask_compress(w)                  # {"shape", "compressed", "bitmask", "row_offsets"}
    w2 = bitmask_decompress(**parts)             # == w, bit for bit
    parse_structure("2:4") == (2, 4)             # "unstructured" -> None
    nm_violations(w != 0, 2, 4)                  # rows/groups holding more than N nonzeros

Conventions. A mask is True where a weight is *kept* (nonzero), as compressed-tensors' bytemask.
"N:M" means at most N nonzero weights in every group of M consecutive input columns of a row
(2:4 and 4:8 are 50% sparse); "unstructured" means no pattern.

Bitmask layout, for a weight [rows, cols] (names under the module prefix, e.g.
`model.layers.0.mlp.up_proj.bitmask`):

    shape        int64 [2]                        (rows, cols)
    compressed   weight dtype [nnz]               the kept values, row by row, left to right
    bitmask      uint8 [rows, ceil(cols / 8)]     bit b of byte j of row r = column 8j + b is kept
                                                  (little bit order: numpy.packbits(...,
                                                  bitorder="little"))
    row_offsets  int64 [rows]                     index in `compressed` where row r starts

    cols:     0 1 2 3 4 5 6 7 | 8 9 ...
    kept:     1 0 0 1 1 0 1 0 | 1 ...      ->  byte 0 = 0b01011001 (bit 0 = column 0)

What it does not know: which modules are sparse or how they were pruned (fastserve.compress),
files (checkpoint.py / records.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

BITMASK_FORMAT = "sparse-bitmask"
BITMASK_PARTS = ("shape", "compressed", "bitmask", "row_offsets")
UNSTRUCTURED = "unstructured"
_BIT_WEIGHTS = [1 << b for b in range(8)]


def parse_structure(structure: str) -> tuple[int, int] | None:
    """ "unstructured" -> None, "N:M" -> (N, M); ValueError unless 1 <= N < M."""
    if structure == UNSTRUCTURED:
        return None
    if not isinstance(structure, str) or structure.count(":") != 1:
        raise ValueError(f"mask_structure must be 'unstructured' or 'N:M', got {structure!r}")
    n_text, m_text = structure.split(":")
    if not (n_text.isdigit() and m_text.isdigit()):
        raise ValueError(f"mask_structure must be 'unstructured' or 'N:M', got {structure!r}")
    n, m = int(n_text), int(m_text)
    if not 1 <= n < m:
        raise ValueError(
            f"mask_structure {structure!r}: N (kept per group) must be at least 1 and smaller "
            "than M (the group width)"
        )
    return n, m


def structure_sparsity(structure: str) -> float | None:
    """The sparsity an N:M structure implies (1 - N / M); None for unstructured."""
    nm = parse_structure(structure)
    return None if nm is None else 1.0 - nm[0] / nm[1]


def nm_violations(kept: Tensor, n: int, m: int) -> int:
    """Number of (row, group of m columns) holding more than n kept weights; kept [rows, cols]
    with cols a multiple of m (ValueError otherwise)."""
    rows, cols = kept.shape
    if cols % m:
        raise ValueError(f"{cols} columns do not split into groups of {m}")
    per_group = kept.reshape(rows, cols // m, m).sum(dim=-1)
    return int((per_group > n).sum())


# ---- bitmask ------------------------------------------------------------------------------------


def pack_bitmask(kept: Tensor) -> Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols / 8)] (little bit order, module docstring)."""
    rows, cols = kept.shape
    pad = (-cols) % 8
    bits = torch.nn.functional.pad(kept.to(torch.uint8), (0, pad)).reshape(rows, -1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=kept.device)
    return (bits.to(torch.int32) * weights).sum(dim=-1).to(torch.uint8)


def unpack_bitmask(bitmask: Tensor, cols: int) -> Tensor:
    """uint8 [rows, ceil(cols / 8)] -> bool [rows, cols] (the inverse of pack_bitmask)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :cols].bool()


def bitmask_compress(weight: Tensor) -> dict[str, Tensor]:
    """A 2-D weight -> its bitmask parts (BITMASK_PARTS; every nonzero is kept, exactly)."""
    if weight.dim() != 2:
        raise ValueError(f"bitmask_compress expects a 2-D weight, got shape {tuple(weight.shape)}")
    kept = weight != 0
    counts = kept.sum(dim=1)
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": weight[kept].contiguous(),
        "bitmask": pack_bitmask(kept),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def bitmask_decompress(
    shape: Tensor, compressed: Tensor, bitmask: Tensor, row_offsets: Tensor
) -> Tensor:
    """The dense weight of bitmask parts; ValueError naming the part that does not fit."""
    if shape.dtype != torch.int64 or tuple(shape.shape) != (2,):
        raise ValueError(f"shape must be int64 [2], got {shape.dtype} {tuple(shape.shape)}")
    rows, cols = (int(v) for v in shape.tolist())
    if rows < 0 or cols < 0:
        raise ValueError(f"shape holds negative sizes {rows, cols}")
    want = (rows, (cols + 7) // 8)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != want:
        got = f"{bitmask.dtype} {tuple(bitmask.shape)}"
        raise ValueError(f"bitmask must be uint8 {want}, got {got}")
    if compressed.dim() != 1 or not compressed.dtype.is_floating_point:
        raise ValueError(f"compressed must be a 1-D float tensor, got {compressed.dtype}")
    kept = unpack_bitmask(bitmask, cols)
    counts = kept.sum(dim=1)
    if int(counts.sum()) != compressed.numel():
        raise ValueError(
            f"bitmask marks {int(counts.sum())} kept weights but compressed holds "
            f"{compressed.numel()}"
        )
    if cols % 8 and bool((bitmask[:, -1] >> (cols % 8)).any()):
        raise ValueError("bitmask has bits set past the last column")
    offsets = torch.cumsum(counts, 0) - counts
    if row_offsets.dtype != torch.int64 or not torch.equal(row_offsets, offsets):
        raise ValueError("row_offsets do not match the bitmask's row counts")
    weight = torch.zeros(rows, cols, dtype=compressed.dtype)
    weight[kept] = compressed
    return weight
