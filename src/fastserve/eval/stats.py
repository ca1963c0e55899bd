"""Statistics over per-token values, with llama.cpp's `llama-perplexity` conventions.

    stderr(x)          standard error of the mean: sqrt(Var(x) / (n - 1)), Var with 1/n
    quantile(x, q)     linear interpolation at q * (n - 1) between the sorted values

Both equal numpy's own (`np.std(x, ddof=1) / sqrt(n)`, `np.quantile(x, q)` with its default
method), which is what llama.cpp computes by hand. Pure functions of numpy arrays; no torch.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["quantile", "stderr"]


def stderr(x: np.ndarray) -> float | None:
    """Standard error of the mean of `x` (None with fewer than two values).

    sqrt(Var(x) / (n - 1)) with the population variance Var = mean(x^2) - mean(x)^2, as
    llama.cpp's `mean_and_uncertainty` (which computes it from running sums and reports 0 below 11
    values; here the variance comes from the values themselves, and only n < 2 has no answer).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2:
        return None
    return math.sqrt(float(x.var()) / (x.size - 1))


def quantile(x: np.ndarray, q: float) -> float:
    """The q-quantile (0 <= q <= 1) of `x`, linear between the two nearest sorted values."""
    return float(np.quantile(np.asarray(x, dtype=np.float64), q))
