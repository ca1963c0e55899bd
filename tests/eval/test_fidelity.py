"""Fidelity statistics: numpy's own on the same per-token values; a model against itself and
against a perturbed copy (fastserve.eval.fidelity, evaluator.score_tokens)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastserve.eval.evaluator import score_tokens
from fastserve.eval.fidelity import fidelity_stats, same_top, token_kld
from fastserve.eval.stats import quantile, stderr
from fastserve.model import load_model


def se(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(x.size))


def test_statistics_equal_numpy_on_the_same_values():
    rng = np.random.default_rng(0)
    n = 1001
    kld = rng.exponential(0.05, n)
    ref_nll = rng.gamma(2.0, 1.0, n)
    target_nll = ref_nll + rng.normal(0.02, 0.1, n)
    same = rng.random(n) < 0.9
    s = fidelity_stats(kld, target_nll, ref_nll, same)

    assert s["num_tokens"] == n
    assert s["kld_mean"] == pytest.approx(kld.mean(), rel=1e-12)
    assert s["kld_mean_stderr"] == pytest.approx(se(kld), rel=1e-12)
    assert s["kld_median"] == pytest.approx(np.median(kld), rel=1e-12)
    for key, q in {"p90": 90, "p95": 95, "p99": 99, "p99_9": 99.9}.items():
        assert s[f"kld_{key}"] == pytest.approx(np.percentile(kld, q), rel=1e-12)
    assert (s["kld_min"], s["kld_max"]) == (kld.min(), kld.max())
    ratio = target_nll - ref_nll
    assert s["ln_ppl_ratio"] == pytest.approx(
        np.log(np.exp(target_nll.mean()) / np.exp(ref_nll.mean()))
    )
    # llama.cpp: sqrt(se_t^2 + se_r^2 - 2 cov / (n - 1)) with population moments
    cov = np.cov(target_nll, ref_nll, ddof=0)[0, 1] / (n - 1)
    llama = math.sqrt(se(target_nll) ** 2 + se(ref_nll) ** 2 - 2 * cov)
    assert s["ln_ppl_ratio_stderr"] == pytest.approx(llama, rel=1e-9)
    assert s["ln_ppl_ratio_stderr"] == pytest.approx(se(ratio), rel=1e-12)
    assert s["ref_ppl"] == pytest.approx(np.exp(ref_nll.mean()), rel=1e-12)
    dp = np.exp(-target_nll) - np.exp(-ref_nll)
    rms = np.sqrt(np.mean(dp**2))
    assert s["delta_p_mean"] == pytest.approx(dp.mean(), rel=1e-12)
    assert s["delta_p_rms"] == pytest.approx(rms, rel=1e-12)
    assert s["delta_p_rms_stderr"] == pytest.approx(se(dp**2) / (2 * rms), rel=1e-12)
    p = same.mean()
    assert s["same_top_pct"] == pytest.approx(100 * p, rel=1e-12)
    assert s["same_top_pct_stderr"] == pytest.approx(100 * np.sqrt(p * (1 - p) / (n - 1)))


def test_stats_helpers():
    x = np.array([3.0, 1.0, 2.0, 10.0])
    assert stderr(x) == pytest.approx(se(x))
    assert stderr(x[:1]) is None
    assert quantile(x, 0.5) == np.median(x)
    with pytest.raises(ValueError):
        fidelity_stats(np.zeros(2), np.zeros(2), np.zeros(3), np.ones(2, dtype=bool))


def test_token_kld_is_kl_divergence():
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(6, 50, generator=g), -1)
    target = torch.log_softmax(torch.randn(6, 50, generator=g), -1)
    expected = F.kl_div(target.double(), ref.double(), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_kld(ref, target), expected, rtol=1e-6, atol=1e-7)
    assert token_kld(ref, ref).abs().max() == 0
    assert same_top(ref, ref).all()


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(2).integers(0, 300, size=121).astype(np.int64)


def test_model_against_itself_is_exact(model_dir, stream):
    model = load_model(model_dir)
    scores = score_tokens(model, stream, 32, 16, batch_size=3, ref_model=model)
    assert np.all(scores.kld == 0) and scores.same_top.all()
    np.testing.assert_array_equal(scores.nll, scores.ref_nll)
    s = fidelity_stats(scores.kld, scores.nll, scores.ref_nll, scores.same_top)
    assert s["kld_mean"] == s["kld_max"] == s["ln_ppl_ratio"] == s["delta_p_rms"] == 0
    assert s["same_top_pct"] == 100 and s["same_top_pct_stderr"] == 0
    assert s["delta_p_rms_stderr"] == 0 and s["ln_ppl_ratio_stderr"] == 0


def test_perturbed_copy_has_positive_divergence(model_dir, perturbed_dir, stream):
    ref, target = load_model(model_dir), load_model(perturbed_dir)
    scores = score_tokens(target, stream, 32, 16, batch_size=4, ref_model=ref)
    s = fidelity_stats(scores.kld, scores.nll, scores.ref_nll, scores.same_top)
    assert scores.kld.min() > -1e-6 and s["kld_mean"] > 1e-3
    assert s["kld_median"] <= s["kld_p90"] <= s["kld_p99"] <= s["kld_p99_9"] <= s["kld_max"]
    assert s["delta_p_rms"] > 0 and 0 < s["same_top_pct"] < 100
    assert s["ln_ppl_ratio"] != 0 and s["ln_ppl_ratio_stderr"] > 0
    # the reference's NLL is the reference scored alone
    alone = score_tokens(ref, stream, 32, 16, batch_size=4)
    np.testing.assert_allclose(scores.ref_nll, alone.nll, rtol=0, atol=1e-6)
