"""`fastserve <stage>`: one subcommand per stage of the loop.

    fastserve data      raw text -> tokenizer + token shards
    fastserve train     token shards -> HF-format model dir (single process or torchrun DDP)
    fastserve generate  model dir + prompt -> text (KV-cached sampling, a first look)
    fastserve serve     model dir -> OpenAI-compatible HTTP server (fastserve.server)
    fastserve demo      data (builtin:stdlib) -> train (small) -> generate, end to end
    fastserve bench serve   load-test an OpenAI-compatible server (vLLM's `bench serve` metrics)
    fastserve chat      terminal chat with a model dir or a server URL (streams tokens)

Each subcommand only parses flags and calls the stage's Python function; nothing here is imported
by the stages. Heavy imports (torch, tokenizers) happen inside the handlers so `--help` is instant.
User errors (`FastServeError`) print one red line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from fastserve.errors import FastServeError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="text files, directories (recursive), .jsonl files, 'builtin:stdlib' (the running "
        "Python's standard library, ~11 MB of .py files) or 'hf:NAME' (needs the datasets "
        "package and network). Default: builtin:stdlib.",
    )
    p.add_argument("--out", required=True, help="output directory for shards, meta.json, tokenizer")
    p.add_argument(
        "--vocab-size", type=int, default=4096, help="BPE vocabulary size to train (default 4096)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="reuse this tokenizer (a tokenizer.json file or a model/shards dir holding one) "
        "instead of training a new one",
    )
    p.add_argument(
        "--include",
        action="append",
        default=None,
        metavar="GLOB",
        help="only read files in input directories matching this glob (repeatable, e.g. "
        "--include '*.py' --include '*.md'); default: every file",
    )
    p.add_argument(
        "--text-field", default="text", help="JSON key holding the text in .jsonl inputs"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="fraction held out for validation (0.1)"
    )
    p.add_argument(
        "--split",
        choices=["docs", "tail"],
        default="docs",
        help="'docs': whole documents go to train or val (seeded shuffle); 'tail': the last "
        "fraction of every document goes to val (nanoGPT's split of a single file)",
    )
    p.add_argument(
        "--max-bytes", type=int, default=None, help="stop reading after this many bytes of text"
    )
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split (1337)")


def _cmd_data(args: argparse.Namespace) -> int:
    from fastserve.data import format_report, prepare_data
    from fastserve.utils.console import console

    meta = prepare_data(
        args.inputs or ["builtin:stdlib"],
        args.out,
        vocab_size=args.vocab_size,
        tokenizer_path=args.tokenizer,
        include=args.include,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        split=args.split,
        seed=args.seed,
        max_bytes=args.max_bytes,
        progress=True,
    )
    console.print(format_report(meta))
    console.print(f"[green]wrote[/green] {args.out}")
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--data-dir style), its help from the field's comment."""
    from fastserve.train.config import TrainConfig, field_help

    helps = field_help(TrainConfig)
    short = {"data_dir": "--data", "out_dir": "--out"}
    for f in dataclasses.fields(TrainConfig):
        flag = short.get(f.name, "--" + f.name.replace("_", "-"))
        names = (
            [flag]
            if flag == "--" + f.name.replace("_", "-")
            else [flag, "--" + f.name.replace("_", "-")]
        )
        help_text = helps.get(f.name, "")
        if f.name == "model_overrides":
            p.add_argument(
                "--set",
                dest="model_overrides",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="Model config override, e.g. --set num_hidden_layers=6 --set "
                "rope_theta=500000 (HF config field names; JSON values). Repeatable.",
            )
            continue
        default = f.default
        if f.type in ("bool", bool):
            p.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        kind = {"int": int, "float": float, "str": str, "float | None": float}.get(str(f.type), str)
        required = default is dataclasses.MISSING
        p.add_argument(
            *names,
            dest=f.name,
            type=kind,
            required=required,
            default=None if required else default,
            help=help_text + ("" if required else f" (default: {default})"),
        )


def _cmd_train(args: argparse.Namespace) -> int:
    from fastserve.model.config import parse_overrides
    from fastserve.train import train
    from fastserve.train.config import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["model_overrides"] = parse_overrides(args.model_overrides)
    result = train(TrainConfig(**values))
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        from fastserve.utils.console import console

        console.print(f"[green]model[/green] {result.final_dir} ({result.stop_reason})")
    return 0


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF-format model directory (with tokenizer)")
    p.add_argument("--prompt", default="", help="prompt text (default: empty, starts from BOS)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (128)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (0.8)"
    )
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p"
    )
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: the checkpoint's)",
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from fastserve.data.tokenizer import Tokenizer
    from fastserve.generate import generate_output
    from fastserve.model import load_model
    from fastserve.utils.console import console, err_console

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_model(args.model, device=args.device, dtype=dtype)
    tokenizer = Tokenizer.load(args.model)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:  # an empty prompt starts from BOS (or EOS, the document separator)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
        prompt_ids = [start if start is not None else tokenizer.eos_token_id]
    out = generate_output(
        model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id,
        seed=args.seed,
    )
    console.print(args.prompt, style="bold", end="", markup=False)
    console.print(tokenizer.decode(out.token_ids), markup=False)
    if out.finish_reason != "length":
        err_console.print(f"[dim]{out.message}[/dim]")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastserve.demo import run_demo

    run_demo(
        args.out,
        train_seconds=args.train_seconds,
        device=args.device,
        model=args.model,
        max_bytes=args.max_bytes,
    )
    return 0


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
    policy="mlfq", kv_cache_memory="1GiB", max_num_seqs=64, max_num_batched_tokens=512, device="cpu"
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
        "--max-queued-requests",
        type=int,
        default=1024,
        help="answer 429 while this many requests wait in the engine (default 1024)",
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
    from fastserve.server.serve import serve

    return serve(
        args.model_dir,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_queued_requests=args.max_queued_requests,
        shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level,
        policy=args.policy,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        device=args.device,
        dtype=args.dtype,
    )


def _add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF-format model directory to compress")
    p.add_argument(
        "--recipe",
        required=True,
        metavar="RECIPE|PRESET",
        help="a YAML recipe file or a preset: w8a16, w4a16, w4a16-gptq, w4a16-awq, w3a16-gptq, "
        "w8a8 (see docs/compress.md)",
    )
    p.add_argument(
        "--calib",
        default=None,
        metavar="DATA",
        help="calibration data: a shard dir from `fastserve data`, a text file or directory, "
        "a .jsonl file or 'builtin:stdlib' (default: none, allowed only for RTN-only recipes)",
    )
    p.add_argument("--out", required=True, help="output directory for the compressed model dir")
    p.add_argument(
        "--num-samples", type=int, default=128, help="calibration samples (default: 128)"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="tokens per calibration sample, capped at the model's context (default: 512)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (0)")
    p.add_argument(
        "--device", default="cpu", help="device the layers are calibrated on (default: cpu)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="float dtype of the saved model (default: the source checkpoint's)",
    )


def _cmd_compress(args: argparse.Namespace) -> int:
    from fastserve.compress import compress
    from fastserve.utils.console import console

    result = compress(
        args.model_dir,
        args.recipe,
        args.calib,
        args.out,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        device=args.device,
        seed=args.seed,
        dtype=args.dtype,
        progress=True,
    )
    size = sum(f.stat().st_size for f in result.out_dir.iterdir() if f.suffix == ".safetensors")
    errors = result.layer_errors
    worst = f", worst layer output error {max(errors):.2e}" if errors else ""
    console.print(
        f"[green]wrote[/green] {result.out_dir} (recipe {result.recipe.name}, "
        f"{size / 2**20:.1f} MiB of weights, {result.time_s:.1f} s{worst})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fastserve import __version__

    parser = argparse.ArgumentParser(
        prog="fastserve",
        description="FastServe: data -> tokenizer -> train -> compress -> serve -> evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"fastserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "data",
        help="clean text, train a BPE tokenizer, write token shards",
        description="Read, clean, dedupe and split a corpus, train (or reuse) a byte-level BPE "
        "tokenizer, and write uint16/uint32 token shards plus meta.json into --out.",
    )
    _add_data_args(p)
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser(
        "train",
        help="train a Llama-family model on token shards (torchrun for DDP)",
        description="Train a model on shards written by `fastserve data`. Writes metrics.jsonl, "
        "run.json, checkpoints/step_N/ and the final HF-format model dir OUT/model. Multi-process: "
        "torchrun --nproc_per_node N -m fastserve train ...",
    )
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "generate",
        help="sample text from a model dir (KV cache)",
        description="Generate a continuation of --prompt with a FastServe or HF Llama-family dir.",
    )
    _add_generate_args(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "compress",
        help="quantize a model dir (RTN, GPTQ, AWQ, SmoothQuant W8A8) by recipe or preset",
        description="Compress MODEL_DIR with a recipe (YAML) or preset, calibrating layer by "
        "layer on --calib, and write a model dir that `generate` and the engine serve.",
    )
    _add_compress_args(p)
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser(
        "demo",
        help="the main job: data (builtin:stdlib) -> train (small) -> generate",
        description="End to end on the built-in corpus (no download): tokenizer + shards from the "
        "Python standard library, a few minutes of training of the 'small' preset, then a sample.",
    )
    p.add_argument("--out", default="runs/demo", help="working directory (runs/demo)")
    p.add_argument(
        "--train-seconds",
        type=float,
        default=240.0,
        help="wall-clock training budget in seconds (240)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument("--model", default="small", help="model preset or config JSON (small)")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="read at most this many bytes of the corpus (default: all ~12 MB)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "bench",
        help="benchmarks; `bench serve` load-tests an OpenAI-compatible server",
        description="Benchmarks. `fastserve bench serve --help` for the serving benchmark.",
    )
    bench = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    p = bench.add_parser(
        "serve",
        help="serving benchmark against any OpenAI-compatible server (vLLM's `bench serve`)",
        description="Stream a workload (random token-id prompts or a dataset) at a server with "
        "Poisson/gamma arrivals; report completed requests, throughput and TTFT / TPOT / ITL / "
        "E2E mean, median, p95, p99 (vLLM's metric names), optionally as JSON.",
    )
    _add_bench_serve_args(p)
    p.set_defaults(func=_cmd_bench_serve)

    p = sub.add_parser(
        "serve",
        help="serve a model dir over the OpenAI API (completions, chat, streaming, /metrics)",
        description="An OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions "
        "(SSE streaming), /v1/models, /health, /tokenize, /detokenize, /metrics (Prometheus). "
        "SIGTERM/SIGINT finish in-flight requests, then exit 0.",
    )
    _add_serve_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "chat",
        help="interactive terminal chat with a model dir or a server URL (streams tokens)",
        description="Chat in the terminal: a model dir runs in-process (chat template of its "
        "tokenizer), a URL is used through /v1/chat/completions. /reset clears the history, "
        "/exit (or Ctrl-D, Ctrl-C) quits.",
    )
    _add_chat_args(p)
    p.set_defaults(func=_cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FastServeError as exc:
        from rich.markup import escape

        from fastserve.utils.console import err_console

        err_console.print("[bold red]error:[/bold red]", escape(str(exc)))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
