"""Evaluation: numbers about a model dir or a running server, as JSON.

Quality of a model (its outputs, scored on data):
  evaluator.py      `evaluate(target, ref=None, data=[...], tasks=[...])`: the results dict of
                    `fastserve eval` for a model dir (remote_eval.py: for a server URL)
  perplexity.py     sliding windows over a token stream; per-token NLL, perplexity, bits per byte
  fidelity.py       KL(ref || target) and llama.cpp's fidelity statistics on the same tokens
  datasets.py       text files, directories, a shard dir's val split -> one token stream + hash
  tasks.py          log-likelihood tasks (piqa, lambada, ARC/HellaSwag jsonl) -> docs, requests;
                    which jsonl / YAML files are generative
  task_yaml.py      YAML task files (lm-eval's keys, Jinja templates, a local jsonl)
  loglikelihood.py  lm-eval's tokenization and metrics; scoring through the serving engine
  engine_runs.py    add requests to an engine as room frees up, step, yield each finished one
  generative.py     generative tasks (prompt or messages rows, references): generation settings,
                    prompts (chat template), generation through the serving engine, the entry
  gen_metrics.py    exact match, sacrebleu's BLEU / chrF, ROUGE-L, their stderrs (pure functions)
  remote.py         scoring through an OpenAI-compatible server (/v1/completions echo logprobs),
                    generation through /v1/completions and /v1/chat/completions
  stats.py          stderr and quantiles with llama.cpp's conventions
  speed.py          `--speed`: prefill, TTFT and decode speed through the serving engine
  memory.py         bytes of weights and of a decode step, RSS, a measured copy bandwidth
  speed_url.py      the same speed numbers of a server, timed on the client
  results.py        the results JSON: schema, model dir hash, versions, reading it back
  tables.py         rich tables of one result and of several compared

Serving measurement (a running server, over HTTP):
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
    "evaluate",
    "format_report",
    "run_benchmark",
    "summarize",
]


def __getattr__(name: str):
    # The serving tools (`bench serve`, `chat URL`) import this package and need no torch: the
    # quality side loads on first use of `evaluate`.
    if name == "evaluate":
        from fastserve.eval.evaluator import evaluate

        return evaluate
    raise AttributeError(f"module 'fastserve.eval' has no attribute {name!r}")
