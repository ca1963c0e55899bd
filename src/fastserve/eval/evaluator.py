"""`evaluate()`: a model dir's perplexity and bits per byte on each dataset, and its fidelity
to a reference model dir on the same tokens, its log-likelihood and generative tasks, and with
`speed` its serving speed (speed.py), as the results dict of results.py.

    from fastserve.eval import evaluate
    r = evaluate("runs/small-w4", ref="runs/small/model", data=["runs/stdlib-data"])
    r["datasets"][0]["perplexity"]["ppl"], r["datasets"][0]["fidelity"]["kld_mean"]

Every check that can fail (the dirs, the tokenizers, the settings against the models' context,
every dataset) runs before any weights are loaded, so a bad input costs no time. `score_tokens`
is the loop: both models see the same windows in the same batches, and only per-token numbers
(NLL, KL, top-token agreement) are kept, never full distributions. Models given as objects
(benchmarks) use `score_tokens` / `evaluate_loaded` directly.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastserve.errors import CheckpointError, ConfigError, DataError
from fastserve.eval.datasets import EvalData, load_data, start_token_id
from fastserve.eval.fidelity import fidelity_stats, same_top, token_kld
from fastserve.eval.perplexity import (
    batch_windows,
    nll_from_logprobs,
    perplexity_stats,
    plan_windows,
    window_logprobs,
)
from fastserve.eval.results import dir_sha256, model_files, model_info, new_results

__all__ = ["TokenScores", "evaluate", "evaluate_loaded", "score_tokens"]

URL_PREFIXES = ("http://", "https://")
DEFAULT_BATCH_SIZE = 8
DEFAULT_TASK_BATCH_TOKENS = (
    2048  # tokens per engine step when scoring tasks (CPU: faster than 4096)
)
MAX_DEFAULT_CONTEXT = 2048  # the default window: the models' context, at most this many tokens


@dataclass
class TokenScores:
    nll: np.ndarray  # [n] float64: the target's NLL (nats) of each scored token, stream order
    ref_nll: np.ndarray | None  # [n] the reference's NLL of the same tokens (None without ref)
    kld: np.ndarray | None  # [n] KL(ref || target) of each position's next-token distribution
    same_top: np.ndarray | None  # [n] bool: both models' most likely next token agree


def progress_bar(enabled: bool):
    """A rich progress display on stderr when enabled and stderr is a terminal, else None."""
    from fastserve.utils.console import err_console

    if not enabled or not err_console.is_terminal:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        "[bold]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )


def score_tokens(
    model,
    tokens: np.ndarray,
    context_len: int,
    stride: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    ref_model=None,
    progress=None,
    description: str = "scoring",
) -> TokenScores:
    """Score tokens[1:] of one stream with sliding windows (perplexity.py); with `ref_model`,
    also the per-token fidelity numbers on the same windows. `progress`: a rich Progress."""
    windows = plan_windows(len(tokens), context_len, stride)
    stream = torch.as_tensor(np.asarray(tokens), dtype=torch.long).to(model.device)
    ref_stream = None if ref_model is None else stream.to(ref_model.device)
    task = progress.add_task(description, total=len(windows)) if progress is not None else None
    parts: dict[str, list[torch.Tensor]] = {"nll": [], "ref_nll": [], "kld": [], "same_top": []}
    for batch in batch_windows(windows, batch_size):
        logprobs, targets = window_logprobs(model, stream, batch)
        parts["nll"].append(nll_from_logprobs(logprobs, targets).double().cpu())
        if ref_model is not None:
            ref_logprobs, _ = window_logprobs(ref_model, ref_stream, batch)
            ref_logprobs = ref_logprobs.to(logprobs.device)
            parts["ref_nll"].append(nll_from_logprobs(ref_logprobs, targets).double().cpu())
            parts["kld"].append(token_kld(ref_logprobs, logprobs).cpu())
            parts["same_top"].append(same_top(ref_logprobs, logprobs).cpu())
        if task is not None:
            progress.update(task, advance=len(batch))
    arrays = {k: torch.cat(v).numpy() if v else None for k, v in parts.items()}
    return TokenScores(**arrays)


def evaluate_loaded(
    model,
    data: EvalData,
    context_len: int,
    stride: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    ref_model=None,
    progress=None,
) -> dict[str, Any]:
    """One dataset's entry of the results: its description, perplexity and fidelity."""
    start = time.perf_counter()
    scores = score_tokens(
        model, data.tokens, context_len, stride, batch_size, ref_model, progress, data.name
    )
    elapsed = time.perf_counter() - start
    fidelity = None
    if scores.kld is not None:
        fidelity = fidelity_stats(scores.kld, scores.nll, scores.ref_nll, scores.same_top)
    return {
        **data.describe(),
        "perplexity": perplexity_stats(scores.nll, data.num_bytes),
        "fidelity": fidelity,
        "time_s": elapsed,
        "tokens_per_s": data.num_scored / max(elapsed, 1e-9),
    }


def is_url(target: str | Path) -> bool:
    return str(target).startswith(URL_PREFIXES)


def _model_dir(path: str | Path, role: str) -> Path:
    text = str(path)
    if is_url(text):
        raise ConfigError(f"{role} {text} is a URL; give a model dir.")
    p = Path(text).expanduser()
    if not p.exists():
        raise CheckpointError(f"{role} {text} does not exist (expected a model dir).")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise CheckpointError(f"{role} {text} is not a model dir (no config.json).")
    return p


def check_sources(data, tasks, speed: bool = False) -> tuple[list[str], list[str]]:
    sources = [str(data)] if isinstance(data, str | Path) else [str(d) for d in data]
    specs = [str(tasks)] if isinstance(tasks, str | Path) else [str(t) for t in tasks]
    if not sources and not specs and not speed:
        raise ConfigError(
            "nothing to evaluate: give datasets (--data FILE|DIR|SHARDS), tasks (--tasks) or "
            "--speed."
        )
    return sources, specs


def task_engine(
    model,
    tokenizer,
    batch_tokens: int,
    kv_cache_memory: str,
    max_num_seqs: int = 128,
    enable_prefix_caching: bool = True,
):
    """The engine that scores tasks: fcfs, no host tier, a KV pool within kv_cache_memory and
    no larger than max_num_seqs full contexts (plus room for cached prefixes)."""
    from fastserve.engine import EngineConfig, LLMEngine
    from fastserve.engine.config import parse_bytes
    from fastserve.engine.runner import ModelRunner

    bs, mc = 16, model.config
    budget = ModelRunner.num_blocks_for_memory(mc, bs, parse_bytes(kv_cache_memory), model.dtype)
    needed = max_num_seqs * -(-mc.max_position_embeddings // bs) + 1024
    config = EngineConfig(
        policy="fcfs",
        num_kv_blocks=max(1, min(budget, needed)),
        block_size=bs,
        swap_space=0,
        preemption_mode="recompute",
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=batch_tokens,
        enable_prefix_caching=enable_prefix_caching,
        device=str(model.device),
    )
    return LLMEngine(model, tokenizer, config)


def prepare_task(task, tokenizer, max_len: int, limit: int | None, gen):
    """A task's encoded requests (loglikelihood.encode_requests, or a generative task's
    GenBatch); every check of the task's docs against the tokenizer and the context."""
    from fastserve.eval.generative import GenTask, TokenizerPrompts, prepare_generation
    from fastserve.eval.loglikelihood import encode_requests, prefix_token_id

    if isinstance(task, GenTask):
        return prepare_generation(task, TokenizerPrompts(tokenizer), max_len, gen, limit)
    prefix = prefix_token_id(tokenizer)
    return encode_requests(task.requests(limit), tokenizer.encode_batch, prefix, max_len, task.name)


def engine_task_runner(engine, gen, progress=None):
    """(task, prepared requests) -> the task's results entry, through `engine`."""
    from fastserve.eval.generative import EngineGenerator, GenTask, run_gen_task
    from fastserve.eval.loglikelihood import EngineScorer, run_task

    scorer, generator = EngineScorer(engine), EngineGenerator(engine)

    def run(task, prepared):
        if isinstance(task, GenTask):
            return run_gen_task(task, prepared, generator, gen, progress)
        return run_task(task, scorer, prepared, progress)

    return run


def check_settings(context_len, stride, batch_size, limit, limits: dict[str, int]) -> None:
    for name, value in (("context_len", context_len), ("stride", stride)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}.")
    if stride > context_len:
        raise ConfigError(f"stride {stride} is larger than context_len {context_len}.")
    for role, max_len in limits.items():
        if context_len > max_len:
            raise ConfigError(
                f"context_len {context_len} is longer than the {role}'s context "
                f"(max_position_embeddings {max_len})."
            )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    if limit is not None and limit < 1:
        raise ConfigError(
            f"limit must be at least 1 (tokens per dataset, docs per task), got {limit}."
        )


def _check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (use cpu, cuda or cuda:N).") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} was asked for, but CUDA is not available here.")


def evaluate(
    target: str | Path,
    ref: str | Path | None = None,
    data: list[str] | tuple[str, ...] | str = (),
    context_len: int | None = None,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
    tasks: list[str] | tuple[str, ...] | str = (),
    task_data: str | Path | None = None,
    task_batch_tokens: int = DEFAULT_TASK_BATCH_TOKENS,
    kv_cache_memory: str = "1GiB",
    tokenizer: str | Path | None = None,
    api_key: str | None = None,
    concurrency: int = 8,
    gen_kwargs: str | dict | None = None,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
    speed: bool | dict | None = False,
) -> dict[str, Any]:
    """Evaluate `target` on each of `data` (text files, directories, shard dirs) and `tasks`
    (built-in names, .jsonl or .yaml task files; built-ins read `task_data`); the results dict.

    target: a model dir (dense or compressed; with `ref`, a reference model dir for fidelity),
    or an http(s) URL of an OpenAI-compatible server (remote_eval.py: `tokenizer` a model dir
    with its tokenizer, `api_key`, `concurrency` requests in flight). context_len: window length
    (default: the models' max_position_embeddings, at most 2048); stride: new tokens scored per
    window (default context_len // 2); limit: at most this many tokens of each dataset and docs
    of each task; dtype: weights dtype (default: each checkpoint's); task_batch_tokens and
    kv_cache_memory: the scoring engine's step budget and KV pool.
    Generative tasks (generative.py): gen_kwargs overrides each task's generation settings
    (lm-eval's --gen_kwargs: "temperature=0.7,max_gen_toks=64", a JSON object or a dict);
    apply_chat_template renders plain prompts as one user message of the chat template;
    log_samples keeps every doc's prompt, output and scores in its entry; bootstrap_iters
    resamples give the stderr of bleu and chrf (0: none).
    speed: True, or a dict of speed.py's options (prompt_len, decode_tokens, batch_sizes,
    repeats), measures prefill / decode speed, TTFT, memory and bandwidth use through the engine
    (for a URL: over HTTP) into results["speed"]; it runs first, right after the target loads,
    so the peak RSS is the model's and the engine's, not the scoring's.
    FastServeError (one line) for bad input: a missing dir, a tokenizer mismatch, a context
    longer than a model's, a missing or empty dataset, a bad task file, a server that is down.
    """
    from fastserve.data.tokenizer import Tokenizer
    from fastserve.eval.generative import GenOptions
    from fastserve.eval.tasks import load_task
    from fastserve.model.checkpoint import load_config, load_model, parse_dtype

    wall_start = time.perf_counter()
    from fastserve.eval.speed import measure_speed, resolve_lengths, speed_options

    speed_opts = speed_options(speed)
    sources, specs = check_sources(data, tasks, speed_opts is not None)
    gen = GenOptions.parse(gen_kwargs, apply_chat_template, log_samples, bootstrap_iters)
    if is_url(target):
        from fastserve.eval.remote_eval import evaluate_url

        if ref is not None:
            raise ConfigError(
                "--ref needs a model dir TARGET; fidelity is not measured over a URL."
            )
        return evaluate_url(
            str(target),
            sources,
            specs,
            task_data,
            context_len,
            stride,
            limit,
            tokenizer,
            api_key,
            concurrency,
            progress,
            gen=gen,
            speed=speed_opts,
        )
    target_dir = _model_dir(target, "target")
    ref_dir = None if ref is None else _model_dir(ref, "--ref")
    configs = {"target": load_config(target_dir)}
    tok = Tokenizer.load(target_dir)
    if tokenizer is not None and Tokenizer.load(tokenizer).fingerprint != tok.fingerprint:
        raise DataError(f"--tokenizer {tokenizer} is not the tokenizer of {target}.")
    if ref_dir is not None:
        configs["ref"] = load_config(ref_dir)
        ref_tokenizer = Tokenizer.load(ref_dir)
        if ref_tokenizer.fingerprint != tok.fingerprint:
            raise DataError(
                f"tokenizer mismatch: {target} and --ref {ref} have different tokenizers "
                f"(tokenizer.json sha256 {tok.fingerprint[:12]} vs "
                f"{ref_tokenizer.fingerprint[:12]}); fidelity compares models on the same tokens."
            )
        if configs["ref"].vocab_size != configs["target"].vocab_size:
            raise DataError(
                f"vocab_size mismatch: {target} has {configs['target'].vocab_size} logits per "
                f"token, --ref {ref} has {configs['ref'].vocab_size}."
            )
    limits = {role: c.max_position_embeddings for role, c in configs.items()}
    if context_len is None:
        context_len = min(*limits.values(), MAX_DEFAULT_CONTEXT)
    if stride is None:
        stride = max(1, context_len // 2)
    check_settings(context_len, stride, batch_size, limit, limits)
    if task_batch_tokens < 1:
        raise ConfigError(f"task_batch_tokens must be at least 1, got {task_batch_tokens}.")
    _check_device(device)
    if dtype is not None:
        dtype = parse_dtype(dtype, "float32")
    datasets = [load_data(src, tok, limit) for src in sources]
    vocab_size = min(c.vocab_size for c in configs.values())
    for d in datasets:
        if int(d.tokens.max()) >= vocab_size:
            raise DataError(
                f"{d.name} has token id {int(d.tokens.max())}, outside the model's vocabulary "
                f"(vocab_size {vocab_size}); the tokenizer does not fit the model."
            )
    task_list = [load_task(spec, task_data) for spec in specs]
    max_len = configs["target"].max_position_embeddings
    # every task check before any weights load
    task_docs = [prepare_task(t, tok, max_len, limit, gen) for t in task_list]
    if speed_opts is not None:
        resolve_lengths(max_len, speed_opts.get("prompt_len"), speed_opts.get("decode_tokens"))

    with progress_bar(progress) as bar:
        shas = {}
        for role, path in (("target", target_dir), ("ref", ref_dir)):
            if path is None:
                continue
            size = sum(f.stat().st_size for f in model_files(path))
            task = bar.add_task(f"hashing {role}", total=size) if bar is not None else None
            advance = (lambda n, t=task: bar.update(t, advance=n)) if bar is not None else None
            shas[role] = dir_sha256(path, advance)
        model = load_model(target_dir, device=device, dtype=dtype)
        speed_entry = None
        if speed_opts is not None:  # before anything else grows the process's peak RSS
            speed_entry = measure_speed(model, tok, device=device, progress=bar, **speed_opts)
        ref_model = None if ref_dir is None else load_model(ref_dir, device=device, dtype=dtype)
        settings = {
            "context_len": context_len,
            "stride": stride,
            "batch_size": batch_size,
            "limit": limit,
            "device": device,
            "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            **gen.settings(task_list),
        }
        results = new_results(
            model_info(target_dir, model, shas["target"]),
            None if ref_model is None else model_info(ref_dir, ref_model, shas["ref"]),
            settings,
            {
                "fingerprint": tok.fingerprint,
                "vocab_size": tok.vocab_size,
                "start_token_id": start_token_id(tok),
            },
        )
        results["speed"] = speed_entry
        for d in datasets:
            entry = evaluate_loaded(model, d, context_len, stride, batch_size, ref_model, bar)
            results["datasets"].append(entry)
        if task_list:
            del ref_model
            engine = task_engine(model, tok, task_batch_tokens, kv_cache_memory)
            run = engine_task_runner(engine, gen, bar)
            results["tasks"].extend(run(t, docs) for t, docs in zip(task_list, task_docs))
    results["wall_time_s"] = time.perf_counter() - wall_start
    return results
