"""`fastserve eval TARGET ...` and `fastserve eval compare A.json B.json ...`.

The first evaluates a model dir or a server URL (fastserve.eval.evaluate) and prints its tables,
the second prints several results files as one table with deltas against the first. The env
var FASTSERVE_DATA (the default --task-data) is read here, once. One positional list
carries both forms (argparse cannot put a subcommand beside a positional TARGET), so a model
dir named `compare` is given as `./compare`. Heavy imports happen inside the handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastserve.cli.command import Command

COMPARE = "compare"


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        metavar="TARGET",
        help="a model dir (dense, or compressed by `fastserve compress`), or the http(s) URL of an "
        "OpenAI-compatible server with echo + logprobs (FastServe, vLLM); or `compare`, followed "
        "by results files",
    )
    p.add_argument("files", nargs="*", metavar="RESULTS.json", help="with `compare`: the files")
    p.add_argument(
        "--ref",
        default=None,
        metavar="REF_DIR",
        help="reference model dir (same tokenizer): adds KL divergence, Δp, same-top-token and "
        "ln(PPL/PPL(ref)) on the same tokens (llama.cpp's --kl-divergence statistics)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE|DIR|SHARDS",
        help="text files, directories of text files, or shard dirs from `fastserve data` (their "
        "val split); repeatable",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME|FILE",
        help="lm-eval-style tasks: piqa, lambada, ARC/HellaSwag-style .jsonl files, generative "
        ".jsonl files (rows {prompt|messages, reference|references}) or .yaml task files "
        "(docs/eval.md); repeatable",
    )
    p.add_argument(
        "--gen-kwargs",
        default=None,
        metavar="K=V,...",
        help="generative tasks: override each task's generation settings, as lm-eval's "
        "--gen_kwargs: until, max_gen_toks, do_sample, temperature, top_p, top_k, seed "
        "(e.g. temperature=0.7,top_p=0.9,max_gen_toks=64,seed=1; or a JSON object such as "
        '\'{"until": ["\\n", "."]}\'); default greedy, 256 tokens',
    )
    p.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="generative tasks: render plain prompts with the tokenizer's chat template (the "
        "prompt as one user message, a task's description as the system message); messages "
        "rows always use it",
    )
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="generative tasks: keep every doc's prompt, output, references and scores in the "
        "results (tasks[].samples of --output)",
    )
    p.add_argument(
        "--bootstrap-iters",
        type=int,
        default=1000,
        metavar="N",
        help="resamples of the docs for the stderr of BLEU and chrF (1000; 0: no stderr)",
    )
    p.add_argument(
        "--speed",
        action="store_true",
        help="also measure speed through the serving engine (a URL: over HTTP): prefill tok/s, "
        "TTFT, decode tok/s and ms/step at each --speed-batch-sizes, weights bytes, peak RSS, "
        "the bytes a decode step reads and their share of the memory bandwidth measured in the "
        "same run; runs first (docs/eval.md)",
    )
    p.add_argument(
        "--speed-prompt-len",
        type=int,
        default=None,
        metavar="N",
        help="--speed: prompt tokens (default 128, clipped to the context)",
    )
    p.add_argument(
        "--speed-decode-tokens",
        type=int,
        default=None,
        metavar="N",
        help="--speed: new tokens per request (default 64, at most half the context)",
    )
    p.add_argument(
        "--speed-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="B",
        help="--speed: batch sizes (a URL: requests in flight) to time decode at (default 1 16)",
    )
    p.add_argument(
        "--speed-repeats",
        type=int,
        default=None,
        metavar="N",
        help="--speed: timed runs per figure, after one warm-up; medians are reported (3)",
    )
    p.add_argument(
        "--task-data",
        default=None,
        metavar="DIR",
        help="where the built-in tasks' files are: DIR/piqa/valid.jsonl, "
        "DIR/lambada/lambada_test.jsonl (default: $FASTSERVE_DATA)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="URL targets: a model dir with the server's tokenizer.json (default: the root dir "
        "the server's /v1/models names, if it is here, else its /tokenize: tasks only)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="URL targets: bearer token (default: $OPENAI_API_KEY)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="URL targets: requests in flight (8), each with up to 16 prompts",
    )
    p.add_argument(
        "--task-batch-tokens",
        type=int,
        default=2048,
        help="tokens per engine step when scoring tasks (2048)",
    )
    p.add_argument(
        "--kv-cache-memory",
        default="1GiB",
        help="KV cache budget of the engine that scores tasks (1GiB)",
    )
    p.add_argument(
        "--context-len",
        type=int,
        default=None,
        help="tokens per window (default: the model's max_position_embeddings, at most 2048)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="new tokens scored per window; each has at least context-len - stride tokens of "
        "context (default: context-len / 2; = context-len: non-overlapping windows)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="windows per forward pass (8); memory ~ batch x context x vocab x 4 bytes",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="at most N tokens per dataset, N docs per task"
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: each checkpoint's)",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="results.json",
        help="write the full results as JSON (atomically; nothing is written on an error)",
    )


def _cmd_eval(args: argparse.Namespace) -> int:
    from fastserve.errors import ConfigError

    if args.target == COMPARE:
        eval_only = {
            "--ref": args.ref,
            "--data": args.data,
            "--output": args.output,
            "--context-len": args.context_len,
            "--stride": args.stride,
            "--limit": args.limit,
            "--dtype": args.dtype,
            "--tasks": args.tasks,
            "--task-data": args.task_data,
            "--tokenizer": args.tokenizer,
            "--gen-kwargs": args.gen_kwargs,
            "--apply-chat-template": args.apply_chat_template or None,
            "--log-samples": args.log_samples or None,
            "--speed": args.speed or None,
        }
        given = [flag for flag, value in eval_only.items() if value not in (None, [])]
        if given:
            raise ConfigError(f"`fastserve eval compare` takes only results files, not {given[0]}.")
        return _compare(args.files)
    if args.files:
        raise ConfigError(
            f"fastserve eval takes one TARGET, got {1 + len(args.files)} "
            f"({args.target}, {', '.join(args.files)}); use --data for datasets, --tasks for tasks."
        )
    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a directory; give a file name.")

    import os

    from fastserve.eval import evaluate
    from fastserve.eval.results import write_results
    from fastserve.eval.tables import results_tables
    from fastserve.utils.console import console

    task_data = args.task_data or os.environ.get("FASTSERVE_DATA") or None
    results = evaluate(
        args.target,
        ref=args.ref,
        data=args.data,
        tasks=args.tasks,
        task_data=task_data,
        task_batch_tokens=args.task_batch_tokens,
        kv_cache_memory=args.kv_cache_memory,
        tokenizer=args.tokenizer,
        api_key=args.api_key,
        concurrency=args.concurrency,
        context_len=args.context_len,
        stride=args.stride,
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        dtype=args.dtype,
        progress=True,
        gen_kwargs=args.gen_kwargs,
        apply_chat_template=args.apply_chat_template,
        log_samples=args.log_samples,
        bootstrap_iters=args.bootstrap_iters,
        speed=_speed(args),
    )
    for table in results_tables(results):
        console.print(table)
    if args.output:
        write_results(args.output, results)
        console.print(f"[green]wrote[/green] {args.output}")
    return 0


def _speed(args: argparse.Namespace) -> dict | None:
    from fastserve.errors import ConfigError

    options = {
        "prompt_len": args.speed_prompt_len,
        "decode_tokens": args.speed_decode_tokens,
        "batch_sizes": args.speed_batch_sizes,
        "repeats": args.speed_repeats,
    }
    if not args.speed:
        given = [k for k, v in options.items() if v is not None]
        if given:
            flag = "--speed-" + given[0].replace("_", "-")
            raise ConfigError(f"{flag} needs --speed.")
        return None
    return options


def _compare(files: list[str]) -> int:
    from fastserve.errors import ConfigError
    from fastserve.eval.results import load_results
    from fastserve.eval.tables import compare_tables
    from fastserve.utils.console import console

    if not files:
        raise ConfigError("fastserve eval compare needs results files: compare A.json B.json ...")
    results = [load_results(f) for f in files]
    names = [Path(f).name for f in files]
    labels = names if len(set(names)) == len(names) else list(files)
    for table in compare_tables(results, labels):
        console.print(table)
    return 0


COMMANDS = [
    Command(
        "eval",
        "perplexity, fidelity (KLD), lm-eval and generative tasks, speed of a model dir or "
        "server; compare results",
        "Evaluate TARGET (a model dir, dense or compressed, or an OpenAI-compatible server URL) on "
        "--data: sliding-window perplexity and bits per byte, and with --ref the KL divergence "
        "statistics of llama.cpp's `llama-perplexity --kl-divergence` on the same tokens; on "
        "--tasks: log-likelihood tasks scored with lm-evaluation-harness's conventions (acc, "
        "acc_norm, perplexity) and generative tasks (exact match, BLEU, chrF, ROUGE-L of greedy "
        "or sampled outputs) through the serving engine; with --speed: prefill and decode speed, "
        "TTFT, memory and bandwidth use; prints tables and writes --output "
        "JSON. `fastserve eval compare A.json B.json ...` prints results side by side with "
        "deltas against the first. See docs/eval.md.",
        _add_eval_args,
        _cmd_eval,
    ),
]
