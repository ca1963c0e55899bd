"""`evaluate()` of a URL target: the same perplexity, log-likelihood and generative tasks as for
a model dir, through an OpenAI-compatible server (remote.py), as the same results dict.

    r = evaluate("http://127.0.0.1:8000", data=["wiki.test.raw"], tasks=["piqa"],
                 task_data="shared/data", tokenizer="runs/small/model")

The tokenizer: `tokenizer` (a model dir, or a tokenizer.json), else the `root` of the server's
/v1/models card when it is a local dir holding a tokenizer.json (FastServe's and vLLM's root is
the model's path), else the server's /tokenize (tasks only: perplexity needs the tokenizer's
eos/bos for its stream). The window: a prompt holds context_len + 1 tokens and the server
generates one more, so context_len is at most the server's max_model_len - 2 (its default, up to
2048). Generative tasks clip max_gen_toks to the server's max_model_len (no clipping when it does
not say) and need no echo: with only generative tasks the probe asks for one generated token.
Every check (the server is up and echoes prompt logprobs, the data, the tasks) runs before the
scoring.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastserve.errors import ConfigError
from fastserve.eval.evaluator import MAX_DEFAULT_CONTEXT, progress_bar
from fastserve.eval.results import new_results

__all__ = ["evaluate_url", "server_info"]

PROBE_TEXT = "The cat sat on the mat."


def _tokenizer(server, tokenizer):
    """(Tokenizer or None, where it came from)."""
    from fastserve.data.tokenizer import Tokenizer

    if tokenizer is not None:
        return Tokenizer.load(tokenizer), str(tokenizer)
    root = Path(server.root).expanduser() if server.root else None
    if root is not None and (root / "tokenizer.json").is_file():
        return Tokenizer.load(root), str(root)
    return None, f"{server.url}/tokenize"


def _check_tokenizer(remote_tok, probe_ids: list[int], source: str) -> None:
    """The local tokenizer must encode as the server's /tokenize does (when it has one)."""
    from fastserve.errors import DataError, FastServeError

    try:
        theirs = remote_tok.encode_batch([PROBE_TEXT])[0]
    except FastServeError:
        return  # no /tokenize (or another API): nothing to compare with
    if theirs != probe_ids:
        raise DataError(
            f"tokenizer mismatch: {source} encodes {PROBE_TEXT!r} as {probe_ids}, the server's "
            f"/tokenize as {theirs}; pass --tokenizer with the served model's dir."
        )


def server_info(server, tokenizer_source: str) -> dict[str, Any]:
    """The "target" entry of a server (the keys of a model dir's entry, most of them None)."""
    return {
        "kind": "server",
        "url": server.url,
        "model": server.model,
        "path": None,
        "sha256": None,
        "weights_bytes": None,
        "dtype": None,
        "max_position_embeddings": server.max_model_len,
        "vocab_size": None,
        "quantization": None,
        "prompt_format": "token_ids" if server.token_prompts else "text",
        "tokenizer": tokenizer_source,
    }


def evaluate_url(
    url: str,
    sources: list[str],
    specs: list[str],
    task_data,
    context_len: int | None,
    stride: int | None,
    limit: int | None,
    tokenizer,
    api_key: str | None,
    concurrency: int,
    progress: bool,
    gen=None,
    speed: dict | None = None,
) -> dict[str, Any]:
    """`gen`: generative.GenOptions (default: its defaults); `speed`: speed.speed_options' dict
    (None: no speed run), measured by speed_url.py before the scoring."""
    from fastserve.eval.datasets import load_data, start_token_id
    from fastserve.eval.evaluator import check_settings
    from fastserve.eval.generative import (
        GenOptions,
        GenTask,
        TokenizerPrompts,
        prepare_generation,
        run_gen_task,
    )
    from fastserve.eval.loglikelihood import encode_requests, prefix_token_id, run_task
    from fastserve.eval.perplexity import perplexity_stats, plan_windows
    from fastserve.eval.remote import (
        RemoteGenerator,
        RemoteScorer,
        RemoteServer,
        RemoteTokenizer,
    )
    from fastserve.eval.tasks import load_task

    wall_start = time.perf_counter()
    gen = gen or GenOptions()
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}.")
    server = RemoteServer(url, api_key, concurrency=concurrency)
    try:
        tok, tok_source = _tokenizer(server, tokenizer)
        if sources and tok is None:
            raise ConfigError(
                f"perplexity over {url} needs the server's tokenizer: pass --tokenizer DIR."
            )
        remote_tok = RemoteTokenizer(server)
        encode_batch = tok.encode_batch if tok is not None else remote_tok.encode_batch
        probe_ids = encode_batch([PROBE_TEXT])[0]
        if tok is not None:
            _check_tokenizer(remote_tok, probe_ids, tok_source)
        task_list = [load_task(spec, task_data) for spec in specs]
        if sources or not all(isinstance(t, GenTask) for t in task_list):
            server.probe(probe_ids)  # echo + logprobs, and whether token-id prompts are taken
        elif not gen.apply_chat_template and any(
            d.messages is None for t in task_list for d in t.docs
        ):
            server.probe_prompts(probe_ids, PROBE_TEXT)  # plain prompts: /v1/completions
        max_window = None if server.max_model_len is None else server.max_model_len - 2
        if context_len is None:
            context_len = min(max_window or MAX_DEFAULT_CONTEXT, MAX_DEFAULT_CONTEXT)
        if stride is None:
            stride = max(1, context_len // 2)
        limits = {} if max_window is None else {"server (max_model_len - 2)": max_window}
        check_settings(context_len, stride, 1, limit, limits)
        datasets = [load_data(src, tok, limit) for src in sources]
        max_len = (server.max_model_len or 2**31) - 1  # + the generated token
        prefix = prefix_token_id(tok)
        prompts = TokenizerPrompts(tok) if tok is not None else remote_tok
        pairs, task_docs = [], []
        for t in task_list:
            if isinstance(t, GenTask):  # prompt + output within max_model_len
                pairs.append(None)
                task_docs.append(prepare_generation(t, prompts, max_len + 1, gen, limit))
                continue
            pairs.append(t.requests(limit))
            task_docs.append(encode_requests(pairs[-1], encode_batch, prefix, max_len, t.name))
        settings = {
            "context_len": context_len,
            "stride": stride,
            "batch_size": None,
            "limit": limit,
            "device": None,
            "dtype": None,
            **gen.settings(task_list),
        }
        tok_info = {
            "fingerprint": None if tok is None else tok.fingerprint,
            "vocab_size": None if tok is None else tok.vocab_size,
            "start_token_id": None if tok is None else start_token_id(tok),
        }
        results = new_results(server_info(server, tok_source), None, settings, tok_info)
        with progress_bar(progress) as bar:
            if speed is not None:
                from fastserve.eval.speed_url import measure_url_speed

                options = dict(speed)
                if "batch_sizes" in options:
                    options["concurrency"] = options.pop("batch_sizes")
                results["speed"] = measure_url_speed(
                    url, model_name=server.model, api_key=api_key, tokenizer=tok, **options
                )
            for d in datasets:
                windows = plan_windows(len(d.tokens), context_len, stride)
                task = bar.add_task(d.name, total=len(windows)) if bar is not None else None
                on_window = (lambda n, t=task: bar.update(t, advance=n)) if bar else None
                start = time.perf_counter()
                nll = server.window_nll(d.tokens, windows, on_window)
                elapsed = time.perf_counter() - start
                results["datasets"].append(
                    {
                        **d.describe(),
                        "perplexity": perplexity_stats(nll, d.num_bytes),
                        "fidelity": None,
                        "time_s": elapsed,
                        "tokens_per_s": d.num_scored / max(elapsed, 1e-9),
                    }
                )
            generator = RemoteGenerator(server)
            for t, p, docs in zip(task_list, pairs, task_docs):
                if isinstance(t, GenTask):
                    entry = run_gen_task(t, docs, generator, gen, bar)
                else:
                    entry = run_task(t, RemoteScorer(server, p), docs, bar)
                results["tasks"].append(entry)
    finally:
        server.close()
    results["wall_time_s"] = time.perf_counter() - wall_start
    return results
