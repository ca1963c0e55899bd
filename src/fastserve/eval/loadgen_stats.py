"""Serving-benchmark statistics: per-request records -> vLLM `bench serve` metrics.

    results = [RequestResult(ok=True, prompt_len=8, output_len=6, ttft_s=0.05,
                             itl_s=[0.01] * 5, e2e_s=0.1)]
    metrics = summarize(results, duration_s=1.0)
    metrics["mean_ttft_ms"], metrics["p99_tpot_ms"], metrics["request_throughput"]

Metric names follow vLLM's `benchmark_serving` JSON: `{mean,median,std,p95,p99}_{ttft,tpot,itl,
e2el}_ms`, `completed`, `request_throughput`, `output_throughput`, `total_token_throughput` ...
TPOT of one request is (E2E - TTFT) / (output_len - 1), defined for output_len >= 2 only; ITL is
every gap between consecutive content chunks of every request. A statistic over no values is None.

Pure functions only: this module knows nothing about HTTP, clocks, workloads or printing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES = (95, 99)  # reported for every latency metric, next to mean / median / std
METRICS = ("ttft", "tpot", "itl", "e2el")  # vLLM's names: e2el is the end-to-end latency


@dataclass
class RequestResult:
    # The request finished with HTTP 200 and a complete stream (`data: [DONE]`).
    ok: bool
    # Prompt tokens: usage.prompt_tokens when the server sends usage, else known from the
    # workload (token-id prompts); None when unknown.
    prompt_len: int | None = None
    # Generated tokens: usage.completion_tokens when given, else the number of content chunks.
    output_len: int = 0
    # Send -> first chunk with non-empty text; None when no text arrived.
    ttft_s: float | None = None
    # Gaps between consecutive content chunks (output chunks after the first).
    itl_s: list[float] = field(default_factory=list)
    # Send -> end of the stream (or the failure).
    e2e_s: float = 0.0
    # Concatenated text of the content chunks.
    generated_text: str = ""
    # Why the request failed ("" when ok): the server's error message or the exception.
    error: str = ""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def tpot_s(result: RequestResult) -> float | None:
    """Time per output token after the first: (E2E - TTFT) / (output_len - 1); None if undefined."""
    if not result.ok or result.ttft_s is None or result.output_len < 2:
        return None
    return (result.e2e_s - result.ttft_s) / (result.output_len - 1)


def describe_ms(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """mean / median / std / p95 / p99 of `values_s` (seconds) in milliseconds, vLLM-named."""
    keys = ["mean", "median", "std", *(f"p{p}" for p in PERCENTILES)]
    if not values_s:
        return {f"{k}_{name}_ms": None for k in keys}
    ms = [v * 1000.0 for v in values_s]
    mean = sum(ms) / len(ms)
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms))  # population std, as np.std
    out = {
        f"mean_{name}_ms": mean,
        f"median_{name}_ms": percentile(ms, 50),
        f"std_{name}_ms": std,
    }
    out.update({f"p{p}_{name}_ms": percentile(ms, p) for p in PERCENTILES})
    return out


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict[str, float | int | None]:
    """The benchmark's metrics over `results` (successful requests only) and its wall time."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in results if r.ok]
    total_input = sum(r.prompt_len or 0 for r in done)
    total_output = sum(r.output_len for r in done)
    samples = {
        "ttft": [r.ttft_s for r in done if r.ttft_s is not None],
        "tpot": [t for t in (tpot_s(r) for r in done) if t is not None],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.e2e_s for r in done],
    }
    metrics: dict[str, float | int | None] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    for name in METRICS:
        metrics.update(describe_ms(name, samples[name]))
    return metrics


def per_request_lists(results: Sequence[RequestResult]) -> dict[str, list]:
    """vLLM's per-request arrays (seconds), in request order, failed requests included."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft_s for r in results],
        "itls": [r.itl_s for r in results],
        "e2els": [r.e2e_s for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    }
