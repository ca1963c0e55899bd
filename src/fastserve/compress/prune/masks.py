"""Pruning masks from scores: which weights to zero, with exactly the requested count.

    mask = row_mask(score, 0.5)        # each row: its floor(0.5 * cols) lowest scores (Wanda)
    mask = matrix_mask(score, 0.5)     # the whole matrix: floor(0.5 * numel) lowest (magnitude)
    mask = nm_mask(score, 2, 4)        # each row, each group of 4 columns: keep the 2 highest

A mask is True where a weight is *pruned* (set to 0), the convention of the SparseGPT and Wanda
code. Counts are exact: floor(sparsity * n) per comparison group (a 1e-9 slack so that 0.29 * 100
is 29, not 28), ties broken toward the lower index (a stable sort), so a mask never prunes more
or fewer weights than asked, whatever the scores.

What it does not know: where scores come from (magnitude.py, wanda.py, sparsegpt.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def num_to_prune(n: int, sparsity: float) -> int:
    """floor(sparsity * n), robust to binary rounding (module docstring)."""
    return math.floor(sparsity * n + 1e-9)


def lowest(score: Tensor, k: int) -> Tensor:
    """bool [R, C]: the k lowest entries of each row of score [R, C] (ties: lower column)."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if k > 0:
        idx = torch.argsort(score, dim=-1, stable=True)[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def row_mask(score: Tensor, sparsity: float) -> Tensor:
    """Each row prunes floor(sparsity * cols) of its lowest scores."""
    return lowest(score, num_to_prune(score.shape[1], sparsity))


def matrix_mask(score: Tensor, sparsity: float) -> Tensor:
    """The matrix prunes floor(sparsity * numel) of its lowest scores."""
    flat = score.reshape(1, -1)
    return lowest(flat, num_to_prune(flat.shape[1], sparsity)).reshape(score.shape)


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Every group of m consecutive columns of each row keeps its n highest scores (prunes
    m - n); cols must be a multiple of m."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{cols} columns do not split into groups of {m}")
    grouped = score.reshape(-1, m)
    return lowest(grouped, m - n).reshape(rows, cols)


def structured_mask(
    score: Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool
) -> Tensor:
    """nm_mask for an N:M structure, else row_mask (per_row) or matrix_mask."""
    if nm is not None:
        return nm_mask(score, *nm)
    return row_mask(score, sparsity) if per_row else matrix_mask(score, sparsity)
