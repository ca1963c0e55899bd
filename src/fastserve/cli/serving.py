"""`fastserve serve | bench serve | chat`: serving a model and talking to servers.

Same shape as stages.py: `_add_*_args` flags, `_cmd_*` handlers with lazy imports, `COMMANDS`.
"""

from __future__ import annotations

import argparse
import os

from fastserve.cli.command import Command
from fastserve.errors import FastServeError


def _add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        "--base-url",
        dest="url",
        default="http://127.0.0.1:8000",
        help="base URL of the OpenAI-compatible server (default: http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--endpoint",
        default="/v1/completions",
        choices=["/v1/completions", "/v1/chat/completions"],
        help="route to benchmark (default: /v1/completions; chat takes text prompts only)",
    )
    p.add_argument(
        "--model", default=None, help="model name to send (default: first id of /v1/models)"
    )
    p.add_argument(
        "--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY, if set)"
    )
    p.add_argument(
        "--dataset",
        default=None,
        metavar="FILE",
        help='jsonl of {"prompt": text or [token ids], "output_len": N} lines, or ShareGPT '
        "json (first human turn -> prompt, reply's token count -> output len); "
        "default: random token-id prompts",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="tokenizer dir: vocab size and special ids for random prompts, token counts for "
        "datasets (needed for ShareGPT unless --output-len is given); default: none",
    )
    p.add_argument(
        "--input-len", type=int, default=None, help="random prompts: tokens per prompt (128)"
    )
    p.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="max_tokens per request (random: default 128; with --dataset: overrides every "
        "entry's output_len)",
    )
    p.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="random lengths uniform in [L*(1-r), L*(1+r)], 0 <= r < 1 (default 0: exact)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="random token ids from [0, V) (default: the --tokenizer's size, else 256)",
    )
    p.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100)")
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="mean requests per second, Poisson arrivals when --burstiness 1; inf sends all "
        "at once (default inf)",
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the inter-arrival gaps: 1 Poisson, < 1 burstier, > 1 more even "
        "(default 1.0)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="at most this many requests in flight (default: unlimited)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default 0)")
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send vLLM's ignore_eos so every output has exactly its max_tokens (default: on "
        "for random prompts, off for --dataset)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="a request fails after this many seconds without data (default 600)",
    )
    p.add_argument("--label", default=None, help="a name stored in the result JSON")
    p.add_argument(
        "--result-json", default=None, metavar="FILE", help="write metrics + per-request data"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar (default: shown)"
    )


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from fastserve.eval.loadgen import BenchConfig, format_report, run_benchmark
    from fastserve.utils.console import console

    names = ("url", "endpoint", "model", "api_key", "dataset", "tokenizer", "input_len")
    names += ("output_len", "range_ratio", "vocab_size", "num_prompts", "request_rate")
    names += ("burstiness", "max_concurrency", "seed", "ignore_eos", "temperature", "label")
    config = BenchConfig(
        **{n: getattr(args, n) for n in names},
        timeout_s=args.timeout,
        result_json=args.result_json,
        progress=not args.no_progress,
    )
    result = run_benchmark(config)
    console.print(format_report(result))
    if args.result_json:
        console.print(f"[green]wrote[/green] {args.result_json}")
    if result["completed"] == 0:
        first = next((e for e in result["errors"] if e), "unknown error")
        raise FastServeError(f"all {result['failed']} requests failed; first error: {first}")
    return 0


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="MODEL_DIR|URL", help="a model dir, or an http(s):// URL")
    p.add_argument("--system", default=None, help="system message (default: none)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per reply (default 256)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (0.8)"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    p.add_argument(
        "--model", default=None, help="URL only: model name (default: first id of /v1/models)"
    )
    p.add_argument(
        "--api-key", default=None, help="URL only: bearer token (default: $OPENAI_API_KEY)"
    )
    p.add_argument("--device", default="cpu", help="model dir only: torch device (default cpu)")
    p.add_argument(
        "--kv-cache-memory",
        default="256MiB",
        help="model dir only: KV cache budget of the engine (default 256MiB)",
    )


def _cmd_chat(args: argparse.Namespace) -> int:
    from fastserve.chat import ChatOptions, run_chat

    names = ("system", "max_tokens", "temperature", "top_p", "seed", "model", "api_key")
    options = ChatOptions(
        **{n: getattr(args, n) for n in names},
        device=args.device,
        kv_cache_memory=args.kv_cache_memory,
    )
    return run_chat(args.target, options)


# EngineConfig's defaults, repeated so `--help` does not import torch (a test keeps them equal).
SERVE_ENGINE_DEFAULTS = dict(
    policy="mlfq",
    kv_cache_memory="1GiB",
    max_num_seqs=64,
    max_num_batched_tokens=512,
    block_size=16,
    swap_space="512MiB",
    preemption_mode="swap",
    device="cpu",
)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    d = argparse.Namespace(**SERVE_ENGINE_DEFAULTS)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF-format model directory to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 = any free (8000)")
    p.add_argument(
        "--policy",
        choices=["mlfq", "fcfs", "priority"],
        default=d.policy,
        help=f"scheduling policy (default {d.policy})",
    )
    p.add_argument(
        "--kv-cache-memory",
        default=d.kv_cache_memory,
        help=f"KV cache budget on the device, e.g. 2GiB (default {d.kv_cache_memory})",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        help=f"sequences per engine step at most (default {d.max_num_seqs})",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=d.max_num_batched_tokens,
        help=f"tokens per engine step at most (default {d.max_num_batched_tokens})",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output (default: the model's max_position_embeddings)",
    )
    p.add_argument(
        "--block-size", type=int, default=d.block_size, help=f"tokens per KV block ({d.block_size})"
    )
    p.add_argument(
        "--swap-space",
        default=d.swap_space,
        help=f"host-memory KV tier for swapped requests, e.g. 1GiB; 0 = none ({d.swap_space})",
    )
    p.add_argument(
        "--preemption-mode",
        choices=["swap", "recompute"],
        default=d.preemption_mode,
        help=f"what a preempted request loses: swap its KV to the host tier or recompute it "
        f"(default {d.preemption_mode})",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="do not share the KV of identical prompt prefixes between requests",
    )
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="answer 429 when a request would make more than this many sequences wait in the "
        "engine; each prompt counts n (default 1024)",
    )
    p.add_argument(
        "--max-request-tokens",
        type=int,
        default=None,
        help="answer 400 when a request's (prompt + max_tokens) x n, summed over its prompts, "
        "is larger (default: no bound beyond the context and --max-queued-requests)",
    )
    p.add_argument(
        "--max-body-size",
        default="16MiB",
        help="answer 413 for a larger request body, e.g. 4MiB (default 16MiB)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("FASTSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1, /tokenize, /detokenize (default: "
        "$FASTSERVE_API_KEY, else no auth)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="model name in the API (default: the model dir's basename)",
    )
    p.add_argument("--device", default=d.device, help=f"torch device (default {d.device})")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: the checkpoint's)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds in-flight requests get to finish (default 30)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info; info logs one line per request)",
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from fastserve.engine.config import parse_bytes
    from fastserve.errors import ConfigError
    from fastserve.server.serve import serve

    try:
        max_body_bytes = parse_bytes(args.max_body_size, "--max-body-size")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    return serve(
        args.model_dir,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_queued_requests=args.max_queued_requests,
        max_request_tokens=args.max_request_tokens,
        max_body_bytes=max_body_bytes,
        shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level,
        policy=args.policy,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        swap_space=args.swap_space,
        preemption_mode=args.preemption_mode,
        enable_prefix_caching=args.enable_prefix_caching,
        device=args.device,
        dtype=args.dtype,
    )


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    bench = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    Command(
        "serve",
        "serving benchmark against any OpenAI-compatible server (vLLM's `bench serve`)",
        "Stream a workload (random token-id prompts or a dataset) at a server with Poisson/gamma "
        "arrivals; report completed requests, throughput and TTFT / TPOT / ITL / E2E mean, "
        "median, p95, p99 (vLLM's metric names), optionally as JSON.",
        _add_bench_serve_args,
        _cmd_bench_serve,
    ).register(bench)


COMMANDS = [
    Command(
        "bench",
        "benchmarks; `bench serve` load-tests an OpenAI-compatible server",
        "Benchmarks. `fastserve bench serve --help` for the serving benchmark.",
        _add_bench_args,
        None,  # the sub-subcommand sets the handler
    ),
    Command(
        "serve",
        "serve a model dir over the OpenAI API (completions, chat, streaming, /metrics)",
        "An OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (SSE "
        "streaming), /v1/models, /health, /tokenize, /detokenize, /metrics (Prometheus). "
        "SIGTERM/SIGINT finish in-flight requests, then exit 0.",
        _add_serve_args,
        _cmd_serve,
    ),
    Command(
        "chat",
        "interactive terminal chat with a model dir or a server URL (streams tokens)",
        "Chat in the terminal: a model dir runs in-process (chat template of its tokenizer), a "
        "URL is used through /v1/chat/completions. /reset clears the history, /exit (or Ctrl-D, "
        "Ctrl-C) quits.",
        _add_chat_args,
        _cmd_chat,
    ),
]
