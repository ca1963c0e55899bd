"""Speed of an OpenAI-compatible server, timed on the client (`fastserve eval URL --speed`):
streaming /v1/completions requests (eval/openai_client.py), `concurrency` at once; the numbers
have the keys of eval/speed.py's engine measurement, with memory and bandwidth unknown (None).

    s = measure_url_speed("http://127.0.0.1:8000", concurrency=(1, 16))
    console.print(speed_table(s))      # fastserve.eval.speed.speed_table

What this module does not know: the engine, model dirs, results files.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from fastserve.errors import FastServeError
from fastserve.eval.speed import (
    DEFAULT_BATCH_SIZES,
    WARMUP_TOKENS,
    check_counts,
    median_of,
    resolve_lengths,
    special_ids,
)

__all__ = ["measure_url_speed"]

COMPLETIONS = "/v1/completions"
NO_MEMORY_NOTE = "not measured: the model runs in the server's process"


def _load_tokenizer(tokenizer):
    if tokenizer is None or hasattr(tokenizer, "encode"):
        return tokenizer
    from fastserve.data.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer)


@dataclass
class _Target:
    url: str
    model: str
    headers: dict
    prompt_format: str = "token_ids"  # or "text": the server refused token-id prompts
    ignore_eos: bool = True  # False: the server refused the ignore_eos extra
    vocab_size: int = 256
    exclude: set[int] = field(default_factory=set)
    tokenizer: Any = None


def _specs(target: _Target, n: int, prompt_len: int, max_tokens: int, seed: int):
    from fastserve.eval.loadgen import random_requests

    as_text = target.prompt_format == "text"
    return random_requests(
        n,
        prompt_len,
        max_tokens,
        vocab_size=target.vocab_size,
        exclude_ids=target.exclude,
        seed=seed,
        tokenizer=target.tokenizer,
        as_text=as_text,
    )


async def _round(client, target: _Target, specs) -> list:
    """Send every request at once; FastServeError naming the first failure."""
    from fastserve.eval.loadgen import build_payload
    from fastserve.eval.openai_client import send_request

    payloads = [build_payload(COMPLETIONS, target.model, s, 0.0, target.ignore_eos) for s in specs]
    results = await asyncio.gather(
        *(
            send_request(client, target.url, COMPLETIONS, p, target.headers, s.prompt_len)
            for p, s in zip(payloads, specs)
        )
    )
    failed = [r for r in results if not r.ok]
    if failed:
        error = failed[0].error
        raise FastServeError(f"{target.url}{COMPLETIONS}: {len(failed)} request(s) failed: {error}")
    if all(r.ttft_s is None for r in results):
        raise FastServeError(f"{target.url}{COMPLETIONS}: the responses streamed no text")
    return list(results)


async def _probe(client, target: _Target, prompt_len: int, seed: int) -> None:
    """Pick the first request shape the server accepts: token ids with ignore_eos, then text
    with ignore_eos, then text without it."""
    errors = []
    for fmt, ignore_eos in (("token_ids", True), ("text", True), ("text", False)):
        target.prompt_format, target.ignore_eos = fmt, ignore_eos
        try:
            await _round(client, target, _specs(target, 1, prompt_len, 2, seed))
            return
        except FastServeError as exc:
            errors.append(str(exc))
    raise FastServeError(f"the server completes none of the speed requests; {errors[0]}")


def _url_record(results, batch: int) -> dict[str, Any]:
    """One round's numbers. A request whose first tokens streamed no text (a special token, a
    partial UTF-8 character) starts its clock at its first text: it has no TTFT when it streamed
    none, and counts in no rate when it streamed text in fewer than two tokens' time."""
    timed = [r for r in results if r.ttft_s is not None]
    ttft = [r.ttft_s for r in timed]
    decoding = [r for r in timed if r.output_len > 1 and r.e2e_s > r.ttft_s]
    rates = [(r.output_len - 1) / (r.e2e_s - r.ttft_s) for r in decoding]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_len - 1) for r in decoding]
    itl = [x for r in results for x in r.itl_s]
    prompt_tokens = [r.prompt_len for r in results if r.prompt_len is not None]
    return {
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_median_s": statistics.median(ttft),
        "ttft_max_s": max(ttft),
        "prompt_tokens_mean": statistics.fmean(prompt_tokens) if prompt_tokens else None,
        "prefill_tokens_per_s": sum(prompt_tokens) / max(ttft) if prompt_tokens else None,
        # batch streams decoding side by side: the sum of their rates
        "decode_tokens_per_s": sum(rates) if len(rates) == batch else None,
        "per_request_decode_tokens_per_s": statistics.fmean(rates) if rates else None,
        "tpot_mean_s": statistics.fmean(tpot) if tpot else None,
        "itl_mean_s": statistics.fmean(itl) if itl else None,
        "itl_median_s": statistics.median(itl) if itl else None,
        "wall_time_s": max(r.e2e_s for r in results),
        "output_tokens": [r.output_len for r in results],
    }


async def _url_runs(target, sizes, prompt_len, decode_tokens, repeats, seed, timeout_s):
    import httpx

    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        await _probe(client, target, prompt_len, seed)
        prefill = []
        for k in range(repeats):
            specs = _specs(target, 1, prompt_len, 1, seed + 1 + k)
            prefill.extend(r for r in await _round(client, target, specs) if r.ttft_s)
        batches = {}
        for b in sizes:
            warm = _specs(target, b, prompt_len, min(decode_tokens, WARMUP_TOKENS), seed + 7)
            await _round(client, target, warm)
            batches[b] = []
            for k in range(repeats):
                specs = _specs(target, b, prompt_len, decode_tokens, seed + 1000 * (k + 1) + b)
                batches[b].append(_url_record(await _round(client, target, specs), b))
    return prefill, batches


def measure_url_speed(
    url: str,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    prompt_len: int | None = None,
    decode_tokens: int | None = None,
    concurrency=DEFAULT_BATCH_SIZES,
    repeats: int = 3,
    tokenizer=None,
    seed: int = 0,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Time to first token, decode tokens/s and inter-token latency of a server, timed on the
    client: streaming greedy /v1/completions requests of `prompt_len` random token ids (text of
    about as many tokens when the server refuses ids) with max_tokens = decode_tokens and
    `ignore_eos` (dropped when refused), `concurrency` requests sent at once. Defaults are
    clipped to the max_model_len /v1/models reports. `tokenizer` (a Tokenizer or its dir): the
    vocabulary for the random ids (else ids < 256) and the text of text prompts."""
    from fastserve.eval.openai_client import auth_headers, fetch_models

    sizes = check_counts(concurrency, repeats, "concurrency")
    url = url.rstrip("/").removesuffix("/v1")
    wall_start = time.perf_counter()
    cards = fetch_models(url, api_key)
    card = next((c for c in cards if c["id"] == model_name), cards[0])
    max_len = card.get("max_model_len") if isinstance(card.get("max_model_len"), int) else None
    prompt_len, decode_tokens = resolve_lengths(max_len, prompt_len, decode_tokens)
    tok = _load_tokenizer(tokenizer)
    target = _Target(url, model_name or str(card["id"]), auth_headers(api_key), tokenizer=tok)
    if tok is not None:
        target.vocab_size, target.exclude = tok.vocab_size, special_ids(tok)
    prefill, records = asyncio.run(
        _url_runs(target, sizes, prompt_len, decode_tokens, repeats, seed, timeout_s)
    )
    batches = []
    for b in sizes:
        entry: dict[str, Any] = {
            "batch_size": b,
            "prompt_len": prompt_len,
            "decode_tokens": decode_tokens,
            "repeats": repeats,
        }
        for key in records[b][0]:
            if key != "output_tokens":
                entry[key] = median_of(records[b], key)
        entry["ms_per_step"] = None if entry["tpot_mean_s"] is None else entry["tpot_mean_s"] * 1e3
        entry["read_gb_per_s"] = entry["bandwidth_utilization"] = None
        entry["runs"] = records[b]
        batches.append(entry)
    ttft = [r.ttft_s for r in prefill]  # the requests that streamed text
    rates = [(r.prompt_len or prompt_len) / r.ttft_s for r in prefill]
    return {
        "kind": "server",
        "url": url,
        "model": target.model,
        "settings": {
            "prompt_len": prompt_len,
            "decode_tokens": decode_tokens,
            "batch_sizes": list(sizes),
            "repeats": repeats,
            "seed": seed,
            "prompt_format": target.prompt_format,
            "ignore_eos": target.ignore_eos,
            "sampling": "greedy" + (", ignore_eos" if target.ignore_eos else ""),
        },
        "prefill": {
            "prompt_len": prompt_len,
            "repeats": repeats,
            "time_s": statistics.median(ttft) if ttft else None,
            "tokens_per_s": statistics.median(rates) if rates else None,
            "ttft_s": statistics.median(ttft) if ttft else None,
        },
        "batches": batches,
        "weights": None,
        "memory": None,
        "bandwidth": None,
        "note": f"weights, memory and bandwidth {NO_MEMORY_NOTE}; times include HTTP",
        "wall_time_s": time.perf_counter() - wall_start,
    }
