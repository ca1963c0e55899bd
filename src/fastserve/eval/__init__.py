"""Evaluation: numbers about a model dir or a running server, as JSON.

loadgen.py        `fastserve bench serve`: workload, arrivals, streaming OpenAI client, results
loadgen_stats.py  per-request records -> vLLM-named serving metrics (pure functions)
openai_client.py  streaming OpenAI API client: SSE, timing, error messages (also for `chat`)
"""

from fastserve.eval.loadgen import BenchConfig, RequestSpec, format_report, run_benchmark
from fastserve.eval.loadgen_stats import RequestResult, summarize

__all__ = [
    "BenchConfig",
    "RequestResult",
    "RequestSpec",
    "format_report",
    "run_benchmark",
    "summarize",
]
