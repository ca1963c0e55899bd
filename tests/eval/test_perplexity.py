"""Sliding-window perplexity: the window plan, batching, and the numbers against direct
float64 computations on a tiny model (fastserve.eval.perplexity and evaluator.score_tokens)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastserve.eval.evaluator import score_tokens
from fastserve.eval.perplexity import (
    batch_windows,
    bits_per_byte,
    nll_from_logprobs,
    perplexity_stats,
    plan_windows,
    token_nll,
)
from tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_tokenizer()).eval()


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(0).integers(0, 300, size=101).astype(np.int64)


def hf_contexts(num_tokens: int, context_len: int, stride: int) -> dict[int, int]:
    """Scored token -> first context index, by the loop of HF's "perplexity of fixed-length
    models" guide with max_length = context_len + 1 (inputs plus the predicted token)."""
    first_context, prev_end = {}, 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_len + 1, num_tokens)
        for t in range(max(prev_end, 1), end):  # labels before prev_end are masked (-100)
            assert t not in first_context, "a token scored twice"
            first_context[t] = begin
        prev_end = end
        if end == num_tokens:
            break
    return first_context


@pytest.mark.parametrize("num_tokens", [2, 5, 33, 64, 65, 100])
@pytest.mark.parametrize(("context_len", "stride"), [(1, 1), (8, 8), (8, 3), (8, 1), (32, 16)])
def test_windows_score_every_token_once_with_enough_context(num_tokens, context_len, stride):
    windows = plan_windows(num_tokens, context_len, stride)
    scored: dict[int, int] = {}
    for k, w in enumerate(windows):
        assert 1 <= w.num_inputs <= context_len and 1 <= w.num_scored <= w.num_inputs
        assert w.begin == k * stride
        for t in range(w.first_scored, w.begin + w.num_inputs + 1):
            assert t not in scored
            scored[t] = w.begin
            if k > 0:  # "at least context - stride tokens of context except at the start"
                assert t - w.begin >= context_len - stride + 1
    assert sorted(scored) == list(range(1, num_tokens))
    assert scored == hf_contexts(num_tokens, context_len, stride)


def test_stride_equal_to_context_is_non_overlapping():
    windows = plan_windows(41, 8, 8)
    assert [(w.begin, w.num_inputs, w.num_scored) for w in windows] == [
        (0, 8, 8),
        (8, 8, 8),
        (16, 8, 8),
        (24, 8, 8),
        (32, 8, 8),
    ]
    with pytest.raises(ValueError):
        plan_windows(10, 4, 5)  # stride > context


def test_batches_are_runs_of_equal_length():
    windows = plan_windows(30, 8, 4)  # the last window is shorter than the others
    batches = list(batch_windows(windows, 3))
    assert [w for b in batches for w in b] == windows
    assert all(len(b) <= 3 and len({w.num_inputs for w in b}) == 1 for b in batches)


@torch.no_grad()
def direct_nll(model, stream: np.ndarray, first_context: dict[int, int]) -> np.ndarray:
    """Each scored token on its own forward pass over exactly its context, log-softmax in
    float64."""
    out = []
    for t in sorted(first_context):
        ids = torch.tensor(stream[first_context[t] : t])[None]
        logprobs = torch.log_softmax(model(ids)[0, -1].double(), dim=-1)
        out.append(-float(logprobs[stream[t]]))
    return np.array(out)


@pytest.mark.parametrize(("context_len", "stride", "batch_size"), [(32, 32, 2), (32, 12, 3)])
def test_perplexity_equals_direct_float64_computation(
    model, stream, context_len, stride, batch_size
):
    scores = score_tokens(model, stream, context_len, stride, batch_size)
    expected = direct_nll(model, stream, hf_contexts(len(stream), context_len, stride))
    np.testing.assert_allclose(scores.nll, expected, rtol=0, atol=2e-5)
    stats = perplexity_stats(scores.nll, num_bytes=1000)
    assert stats["num_tokens"] == len(stream) - 1
    assert stats["ppl"] == pytest.approx(math.exp(expected.mean()), rel=1e-6)
    assert stats["bits_per_byte"] == pytest.approx(expected.sum() / math.log(2) / 1000, rel=1e-6)


@torch.no_grad()
def test_stride_equal_to_context_matches_trainer_style_windows(model, stream):
    """Windows of C + 1 tokens, x = w[:-1], y = w[1:], one after the other (the trainer's and
    the old benchmarks' layout), the tail included."""
    context = 16
    total = 0.0
    for begin in range(0, len(stream) - 1, context):
        chunk = torch.tensor(stream[begin : begin + context + 1])[None]
        logits = model(chunk[:, :-1])
        total += float(F.cross_entropy(logits[0].double(), chunk[0, 1:], reduction="sum"))
    scores = score_tokens(model, stream, context, context, batch_size=4)
    assert scores.nll.sum() == pytest.approx(total, rel=1e-6)


def test_token_nll_is_cross_entropy_and_gathered_logprobs():
    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))
    nll = token_nll(logits, targets)
    assert nll.shape == targets.shape
    gathered = nll_from_logprobs(torch.log_softmax(logits.flatten(0, 1), -1), targets.flatten())
    assert torch.equal(nll.flatten(), gathered)
    mean = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    assert torch.equal(token_nll(logits, targets, reduction="mean"), mean)  # the trainer's call


def test_perplexity_stats_equal_numpy():
    nll = np.random.default_rng(1).gamma(2.0, 1.5, size=500)
    stats = perplexity_stats(nll, num_bytes=1234)
    se = np.std(nll, ddof=1) / np.sqrt(nll.size)
    assert stats["nll_mean"] == pytest.approx(nll.mean(), rel=1e-12)
    assert stats["nll_mean_stderr"] == pytest.approx(se, rel=1e-12)
    assert stats["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-12)
    assert stats["ppl_stderr"] == pytest.approx(np.exp(nll.mean()) * se, rel=1e-12)
    assert stats["bits_per_byte"] == pytest.approx(nll.sum() / np.log(2) / 1234, rel=1e-12)
    assert bits_per_byte(2.0, 1.0) == pytest.approx(2 / math.log(2))
    assert perplexity_stats(nll[:1], None)["nll_mean_stderr"] is None
