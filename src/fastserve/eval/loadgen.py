"""`fastserve bench serve`: a serving benchmark client for any OpenAI-compatible server.

    config = BenchConfig(url="http://127.0.0.1:8000", num_prompts=200, request_rate=4.0,
                         input_len=128, output_len=64, result_json="bench.json")
    result = run_benchmark(config)           # vLLM `bench serve` metrics + per-request arrays
    console.print(format_report(result))

vLLM's conventions: a workload of random token-id prompts of `input_len` tokens (lengths spread by
`range_ratio`) or a dataset file (jsonl `{"prompt", "output_len"}` lines, or ShareGPT
conversations); arrivals with gamma-distributed gaps of shape `burstiness` and mean 1/rate (1 =
Poisson; rate inf sends everything at once); an optional concurrency cap. Every request streams
(SSE) with `max_tokens` = its output length and `stream_options.include_usage`, and is timed on
the client: TTFT (first chunk with text), ITL (gaps between content chunks), E2E. Statistics live
in `loadgen_stats.py`, the streaming HTTP client in `openai_client.py`.

What this module does not know: the server behind the URL (only the OpenAI API: /v1/models,
/v1/completions, /v1/chat/completions, plus vLLM's `ignore_eos` extra), or the engine.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastserve.errors import ConfigError, DataError
from fastserve.eval.loadgen_stats import RequestResult, per_request_lists, summarize
from fastserve.eval.openai_client import CHAT_ENDPOINT, auth_headers, discover_model, send_request

ENDPOINTS = ("/v1/completions", CHAT_ENDPOINT)
DEFAULT_INPUT_LEN = 128
DEFAULT_OUTPUT_LEN = 128
# Text prompts for the chat endpoint without a tokenizer: token id i -> WORDS[i % len(WORDS)].
WORDS = tuple(
    "the of and to in is that for it as with was on be by at this are from or an which have not "
    "but one all were can more when there been some time would other into what its about than "
    "only new could these also first two may then any like used such each way most".split()
)


@dataclass
class RequestSpec:
    # Text (chat or completions) or token ids (completions only; sent exactly as given).
    prompt: str | list[int]
    # Prompt tokens when known before sending (token-id prompts, or counted with --tokenizer).
    prompt_len: int | None
    # max_tokens of the request.
    output_len: int


@dataclass
class BenchConfig:
    # Server base URL (the OpenAI routes are appended).
    url: str = "http://127.0.0.1:8000"
    # Route to benchmark: /v1/completions or /v1/chat/completions.
    endpoint: str = "/v1/completions"
    # Model name sent with every request; None -> the first id listed by /v1/models.
    model: str | None = None
    # Bearer token; None -> $OPENAI_API_KEY when set, else no Authorization header.
    api_key: str | None = None
    # jsonl ({"prompt": str | [ids], "output_len": int} per line) or ShareGPT json; None -> random.
    dataset: str | None = None
    # Tokenizer dir: vocab + special ids for random prompts, token counts for datasets.
    tokenizer: str | None = None
    # Random workload: prompt tokens (default 128); with a dataset this flag is refused.
    input_len: int | None = None
    # Random workload: max_tokens (default 128); with a dataset it overrides every entry.
    output_len: int | None = None
    # Random workload: lengths uniform in [L * (1 - r), L * (1 + r)], 0 <= r < 1.
    range_ratio: float = 0.0
    # Random token ids come from [0, vocab_size); None -> the tokenizer's size, else 256.
    vocab_size: int | None = None
    # Requests to send.
    num_prompts: int = 100
    # Mean arrivals per second; inf sends every request at time 0.
    request_rate: float = math.inf
    # Gamma shape of the inter-arrival gaps (1 = Poisson; < 1 burstier, > 1 more regular).
    burstiness: float = 1.0
    # At most this many requests in flight; None -> unlimited.
    max_concurrency: int | None = None
    # Seed of the workload and the arrival times.
    seed: int = 0
    # Send `ignore_eos: true` (vLLM extra) so outputs are exactly output_len tokens;
    # None -> on for random workloads, off for datasets.
    ignore_eos: bool | None = None
    # Sampling temperature of every request (0 = greedy).
    temperature: float = 0.0
    # A request fails after this many seconds without a byte from the server.
    timeout_s: float = 600.0
    # Free-form name stored in the result JSON.
    label: str | None = None
    # Write the result (metrics, config, per-request arrays) here as JSON.
    result_json: str | None = None
    # Show a progress bar over completed requests (on stderr, when it is a terminal).
    progress: bool = True

    def validate(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(f"--endpoint must be one of {', '.join(ENDPOINTS)}")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--url must start with http:// or https://, got {self.url!r}")
        if self.dataset is not None and self.input_len is not None:
            raise ConfigError("--input-len is for random workloads; a --dataset has its prompts")
        checks = [
            ("--num-prompts", self.num_prompts, self.num_prompts >= 1),
            ("--request-rate", self.request_rate, self.request_rate > 0),
            ("--burstiness", self.burstiness, 0 < self.burstiness < math.inf),
            ("--range-ratio", self.range_ratio, 0 <= self.range_ratio < 1),
            ("--temperature", self.temperature, self.temperature >= 0),
            ("--timeout", self.timeout_s, self.timeout_s > 0),
        ]
        for name, value in (("--input-len", self.input_len), ("--output-len", self.output_len)):
            checks.append((name, value, value is None or value >= 1))
        for name, value in (
            ("--vocab-size", self.vocab_size),
            ("--max-concurrency", self.max_concurrency),
        ):
            checks.append((name, value, value is None or value >= 1))
        for name, value, ok in checks:
            if not ok:
                raise ConfigError(f"{name} out of range: {value}")


# ---- workload ----------------------------------------------------------------------------------


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    *,
    range_ratio: float = 0.0,
    vocab_size: int = 256,
    exclude_ids: set[int] | frozenset[int] = frozenset(),
    seed: int = 0,
    tokenizer=None,
    as_text: bool = False,
) -> list[RequestSpec]:
    """vLLM's random dataset: prompts of uniformly drawn token ids (special ids excluded).

    Lengths are uniform integers in [int(L * (1 - r)), int(L * (1 + r))] (at least 1). With
    `as_text` (the chat endpoint takes text) the ids are decoded by `tokenizer`, or mapped to
    words without one; the prompt length is then left to the server's usage report.
    """
    rng = np.random.default_rng(seed)
    allowed = np.array(sorted(set(range(vocab_size)) - set(exclude_ids)), dtype=np.int64)
    if allowed.size == 0:
        raise ConfigError("no token ids left to draw prompts from (vocab size vs special ids)")

    def lens(length: int) -> np.ndarray:
        low = max(1, int(length * (1 - range_ratio)))
        high = max(low, int(length * (1 + range_ratio)))
        return rng.integers(low, high + 1, size=num_prompts)

    in_lens, out_lens = lens(input_len), lens(output_len)
    specs = []
    for n_in, n_out in zip(in_lens, out_lens):
        ids = [int(t) for t in rng.choice(allowed, size=int(n_in))]
        if not as_text:
            specs.append(RequestSpec(ids, len(ids), int(n_out)))
            continue
        text = (
            tokenizer.decode(ids)
            if tokenizer is not None
            else " ".join(WORDS[i % len(WORDS)] for i in ids)
        )
        specs.append(RequestSpec(text, None, int(n_out)))
    return specs


def load_dataset(
    path: str | os.PathLike, tokenizer=None, output_len: int | None = None
) -> list[RequestSpec]:
    """Entries of a jsonl file or a ShareGPT json file, in file order. DataError when unusable.

    jsonl: one `{"prompt": str | [token ids], "output_len": int}` object per line (`output_len`
    may be left out when `output_len` is given, which also overrides every line).
    ShareGPT: a list of `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt",
    ...}]}`; the first human turn is the prompt, the reply's token count (needs `tokenizer`,
    unless `output_len` is given) its output length. Conversations without both are skipped.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"dataset {str(file)!r} is not a file.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"dataset {str(file)!r} is not UTF-8 text.") from None
    if not text.strip():
        raise DataError(f"dataset {str(file)!r} is empty.")
    if _is_json_list(text):
        specs = _sharegpt(file, text, tokenizer, output_len)
    else:
        specs = [
            _jsonl_entry(file, i, line, tokenizer, output_len)
            for i, line in enumerate(text.splitlines(), 1)
            if line.strip()
        ]
    if not specs:
        raise DataError(f"dataset {str(file)!r} has no usable entries.")
    return specs


def _is_json_list(text: str) -> bool:
    return text.lstrip().startswith("[")


def is_sharegpt(path: str | os.PathLike) -> bool:
    """A ShareGPT json file (a JSON list) rather than jsonl (one object per line)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return _is_json_list(f.read(4096))


def _jsonl_entry(file: Path, lineno: int, line: str, tokenizer, output_len: int | None):
    where = f"{file}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}).") from None
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise DataError(f'{where}: expected an object with a "prompt" key.')
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and t >= 0 for t in prompt):
            raise DataError(f'{where}: "prompt" must be text or a non-empty list of token ids.')
        prompt_len = len(prompt)
    elif isinstance(prompt, str) and prompt:
        prompt_len = len(tokenizer.encode(prompt)) if tokenizer is not None else None
    else:
        raise DataError(f'{where}: "prompt" must be text or a non-empty list of token ids.')
    n_out = output_len if output_len is not None else obj.get("output_len")
    if n_out is None:
        raise DataError(f'{where}: no "output_len" (or pass --output-len for every entry).')
    if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out < 1:
        raise DataError(f'{where}: "output_len" must be a positive integer, got {n_out!r}.')
    return RequestSpec(prompt, prompt_len, n_out)


def _sharegpt(file: Path, text: str, tokenizer, output_len: int | None) -> list[RequestSpec]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}: not valid JSON ({exc.msg}, line {exc.lineno}).") from None
    if output_len is None and tokenizer is None:
        raise DataError(
            f"{file}: ShareGPT replies need --tokenizer DIR to count their tokens "
            "(or --output-len N for every request)."
        )
    specs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise DataError(f'{file}: expected a list of objects with "conversations".')
        pair = _first_exchange(turns)
        if pair is None:
            continue
        prompt, reply = pair
        n_out = output_len if output_len is not None else len(tokenizer.encode(reply))
        if n_out < 1:
            continue
        prompt_len = len(tokenizer.encode(prompt)) if tokenizer is not None else None
        specs.append(RequestSpec(prompt, prompt_len, n_out))
    return specs


def _first_exchange(turns: list) -> tuple[str, str] | None:
    """The first human turn with text and the model turn right after it."""
    for turn, reply in zip(turns, turns[1:]):
        if not (isinstance(turn, dict) and isinstance(reply, dict)):
            return None
        if (
            turn.get("from") in ("human", "user")
            and reply.get("from") in ("gpt", "assistant", "chatgpt")
            and isinstance(turn.get("value"), str)
            and turn["value"]
            and isinstance(reply.get("value"), str)
        ):
            return turn["value"], reply["value"]
    return None


def pick_requests(
    entries: list[RequestSpec], num_prompts: int, seed: int = 0, shuffle: bool = False
) -> list[RequestSpec]:
    """`num_prompts` entries: in order (seeded shuffle first if asked), cycling when too few."""
    order = list(range(len(entries)))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [entries[order[i % len(order)]] for i in range(num_prompts)]


def arrival_times(
    num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Send times in seconds from the start: the first at 0, then gamma(shape=burstiness,
    scale=1 / (rate * burstiness)) gaps (mean 1 / rate, CV^2 = 1 / burstiness; vLLM's
    `get_request`). Rate inf: all at 0."""
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request_rate and burstiness must be > 0")
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng((seed, 1))  # a stream apart from the workload's
    gaps = rng.gamma(burstiness, 1.0 / (request_rate * burstiness), size=num_requests - 1)
    return [0.0, *(float(t) for t in np.cumsum(gaps))]


def build_payload(
    endpoint: str, model: str, spec: RequestSpec, temperature: float, ignore_eos: bool
) -> dict:
    payload: dict = {
        "model": model,
        "temperature": float(temperature),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == CHAT_ENDPOINT:
        if not isinstance(spec.prompt, str):
            raise ConfigError("the chat endpoint takes text prompts, not token ids")
        payload["messages"] = [{"role": "user", "content": spec.prompt}]
        payload["max_completion_tokens"] = spec.output_len
    else:
        payload["prompt"] = spec.prompt
        payload["max_tokens"] = spec.output_len
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


# ---- the benchmark ----------------------------------------------------------------------------


def build_workload(config: BenchConfig) -> tuple[list[RequestSpec], bool]:
    """The requests to send and whether ignore_eos applies by default (random workloads)."""
    tokenizer = None
    if config.tokenizer is not None:
        from fastserve.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(config.tokenizer)
    chat = config.endpoint == CHAT_ENDPOINT
    if config.dataset is not None:
        entries = load_dataset(config.dataset, tokenizer, config.output_len)
        if chat and any(not isinstance(e.prompt, str) for e in entries):
            if tokenizer is None:
                raise DataError("token-id prompts need --tokenizer to be sent as chat text.")
            entries = [
                RequestSpec(tokenizer.decode(e.prompt), None, e.output_len)
                if isinstance(e.prompt, list)
                else e
                for e in entries
            ]
        shuffle = is_sharegpt(config.dataset)  # vLLM samples ShareGPT at random, seeded
        return pick_requests(entries, config.num_prompts, config.seed, shuffle=shuffle), False
    vocab_size, exclude = config.vocab_size or 256, set()
    if tokenizer is not None:
        vocab_size = config.vocab_size or tokenizer.vocab_size
        added = tokenizer.backend.get_added_tokens_decoder()
        exclude = {i for i, tok in added.items() if tok.special}
        exclude |= {
            i
            for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
            if i is not None
        }
    specs = random_requests(
        config.num_prompts,
        config.input_len or DEFAULT_INPUT_LEN,
        config.output_len or DEFAULT_OUTPUT_LEN,
        range_ratio=config.range_ratio,
        vocab_size=vocab_size,
        exclude_ids=exclude,
        seed=config.seed,
        tokenizer=tokenizer,
        as_text=chat,
    )
    return specs, True


def run_benchmark(config: BenchConfig) -> dict:
    """Send the workload, return the result dict (and write `config.result_json`)."""
    config.validate()
    specs, random_workload = build_workload(config)
    ignore_eos = random_workload if config.ignore_eos is None else config.ignore_eos
    url = config.url.rstrip("/")
    model = config.model or discover_model(url, config.api_key)
    payloads = [
        build_payload(config.endpoint, model, s, config.temperature, ignore_eos) for s in specs
    ]
    times = arrival_times(len(specs), config.request_rate, config.burstiness, config.seed)
    results, duration_s = asyncio.run(_send_all(config, url, specs, payloads, times))
    result = {
        "date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "label": config.label,
        "backend": "openai-chat" if config.endpoint == CHAT_ENDPOINT else "openai",
        "base_url": url,
        "endpoint": config.endpoint,
        "model_id": model,
        "num_prompts": len(specs),
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "ignore_eos": ignore_eos,
        "temperature": config.temperature,
        "seed": config.seed,
        "dataset": config.dataset,
        **summarize(results, duration_s),
        **per_request_lists(results),
    }
    if config.result_json:
        from fastserve.utils.io import atomic_write_json

        atomic_write_json(config.result_json, result)
    return result


async def _send_all(config, url, specs, payloads, times) -> tuple[list[RequestResult], float]:
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from fastserve.utils.console import err_console

    headers = auth_headers(config.api_key)
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    timeout = httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 30.0))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    progress = Progress(
        "requests",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=not (config.progress and err_console.is_terminal),
        transient=True,
    )
    task_id = progress.add_task("requests", total=len(specs))

    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:

        async def one(payload: dict, spec: RequestSpec) -> RequestResult:
            if limit is None:
                result = await send_request(
                    client, url, config.endpoint, payload, headers, spec.prompt_len
                )
            else:
                async with limit:  # like vLLM: the latency clock starts when the slot is free
                    result = await send_request(
                        client, url, config.endpoint, payload, headers, spec.prompt_len
                    )
            progress.advance(task_id)
            return result

        with progress:
            start = time.perf_counter()
            tasks = []
            for payload, spec, t in zip(payloads, specs, times):
                delay = start + t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(payload, spec)))
            results = await asyncio.gather(*tasks)
            duration_s = time.perf_counter() - start
    return list(results), duration_s


def format_report(result: dict):
    """Two rich tables: counts and throughput, then latency statistics in milliseconds."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    def num(value, fmt: str = ".2f") -> str:
        return "-" if value is None else format(value, fmt)

    head = Table(title="Serving benchmark", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column(justify="right")
    rows = [
        ("model / endpoint", f"{result['model_id']}  {result['endpoint']}"),
        ("request rate / burstiness", f"{result['request_rate']} / {result['burstiness']}"),
        ("successful requests", str(result["completed"])),
        ("failed requests", str(result["failed"])),
        ("benchmark duration (s)", num(result["duration"])),
        ("total input tokens", str(result["total_input_tokens"])),
        ("total generated tokens", str(result["total_output_tokens"])),
        ("request throughput (req/s)", num(result["request_throughput"])),
        ("output token throughput (tok/s)", num(result["output_throughput"])),
        ("total token throughput (tok/s)", num(result["total_token_throughput"])),
    ]
    for name, value in rows:
        head.add_row(name, value)
    lat = Table(title="Latency (ms)", title_justify="left")
    for col in ("metric", "mean", "median", "p95", "p99"):
        lat.add_column(col, justify="left" if col == "metric" else "right")
    labels = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}
    for key, label in labels.items():
        lat.add_row(
            label, *(num(result[f"{s}_{key}_ms"]) for s in ("mean", "median", "p95", "p99"))
        )
    parts = [head, lat]
    errors = [e for e in result["errors"] if e]
    if errors:
        parts.append(f"[red]{len(errors)} failed[/red], first error: {escape(errors[0])}")
    return Group(*parts)
