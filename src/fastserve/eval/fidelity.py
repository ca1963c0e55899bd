"""Fidelity of a target model to a reference on the same tokens: llama.cpp's KLD statistics.

    kld = token_kld(ref_logprobs, target_logprobs)          # per token, nats, float64
    same = same_top(ref_logprobs, target_logprobs)          # per token, bool
    stats = fidelity_stats(kld, target_nll, ref_nll, same)   # the summary dict

The statistics are those `llama-perplexity --kl-divergence` prints, over the scored tokens:
  kld_*            KL(ref || target) = sum_v p_ref(v) (log p_ref(v) - log p_target(v)) per token:
                   mean (with stderr), median, p90 / p95 / p99 / p99.9, min and max
  ln_ppl_ratio     ln(PPL(target) / PPL(ref)) = mean(nll_target - nll_ref), with the stderr of
                   that per-token difference (llama.cpp's sqrt(se_t^2 + se_r^2 - 2 cov), the same
                   number)
  delta_p_*        dp = p_target(x) - p_ref(x) of the observed token x: mean (stderr) and RMS =
                   sqrt(mean(dp^2)), whose stderr is stderr(dp^2) / (2 RMS)
  same_top_pct     % of tokens where both models' most likely token is the same, stderr
                   100 sqrt(p (1 - p) / (n - 1))
Unlike llama.cpp, the reference's log-probabilities are exact (llama.cpp stores them in 16 bits
and drops those below -16 from the KL sum). Knows nothing about windows or files.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastserve.eval.stats import quantile, stderr

__all__ = ["KLD_QUANTILES", "fidelity_stats", "same_top", "token_kld"]

# result key suffix -> quantile of the per-token KL divergence
KLD_QUANTILES = {"median": 0.5, "p90": 0.90, "p95": 0.95, "p99": 0.99, "p99_9": 0.999}


def token_kld(ref_logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || target) per row of log-probabilities [n, V] -> [n] float64, summed in float64.

    Identical rows give exactly 0; rounding can make a near-zero value slightly negative (kept,
    as llama.cpp keeps it)."""
    terms = ref_logprobs.exp() * (ref_logprobs - target_logprobs)
    return terms.sum(-1, dtype=torch.float64)


def same_top(ref_logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """[n] bool: the two models' argmax tokens agree (ties go to the lowest id in both)."""
    return ref_logprobs.argmax(-1) == target_logprobs.argmax(-1)


def fidelity_stats(
    kld: np.ndarray, target_nll: np.ndarray, ref_nll: np.ndarray, same: np.ndarray
) -> dict:
    """The summary dict (see the module docstring) from per-token values of the scored tokens."""
    kld = np.asarray(kld, dtype=np.float64)
    target_nll = np.asarray(target_nll, dtype=np.float64)
    ref_nll = np.asarray(ref_nll, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    n = kld.size
    if n == 0 or not (target_nll.size == ref_nll.size == same.size == n):
        raise ValueError("fidelity statistics need the same non-zero number of values of each kind")
    ratio = target_nll - ref_nll
    dp = np.exp(-target_nll) - np.exp(-ref_nll)
    dp2 = dp * dp
    rms = math.sqrt(float(dp2.mean()))
    se_dp2 = stderr(dp2)
    p_same = float(same.mean())
    ref_mean = float(ref_nll.mean())
    ref_se = stderr(ref_nll)
    out = {
        "num_tokens": int(n),
        "ref_ppl": math.exp(ref_mean),
        "ref_ppl_stderr": None if ref_se is None else math.exp(ref_mean) * ref_se,
        "ln_ppl_ratio": float(ratio.mean()),
        "ln_ppl_ratio_stderr": stderr(ratio),
        "ppl_ratio": math.exp(float(ratio.mean())),
        "kld_mean": float(kld.mean()),
        "kld_mean_stderr": stderr(kld),
    }
    out.update({f"kld_{name}": quantile(kld, q) for name, q in KLD_QUANTILES.items()})
    out.update(
        kld_min=float(kld.min()),
        kld_max=float(kld.max()),
        delta_p_mean=float(dp.mean()),
        delta_p_mean_stderr=stderr(dp),
        delta_p_rms=rms,
        delta_p_rms_stderr=None if se_dp2 is None else (0.0 if rms == 0 else se_dp2 / (2 * rms)),
        same_top_pct=100 * p_same,
        same_top_pct_stderr=None if n < 2 else 100 * math.sqrt(p_same * (1 - p_same) / (n - 1)),
    )
    return out
