"""Speed of a model through the serving engine, or of a server over HTTP (`fastserve eval --speed`).

    from fastserve.eval.speed import measure_speed, speed_table
    s = measure_speed(model, tokenizer)                  # prompt 128, 64 new tokens, batch 1 / 16
    s["batches"][1]["decode_tokens_per_s"], s["batches"][1]["bandwidth_utilization"]
    console.print(speed_table(s))                        # also of eval/speed_url.py's dicts

A model is measured on the path users serve on: an `LLMEngine` (fcfs, prefix caching off so that
no repeat reuses another's KV, a KV pool that holds every sequence, no host tier, the serving
token budget per step), greedy requests of seeded random token ids with `ignore_eos`, so every
request makes exactly `decode_tokens` tokens. A batch of B requests is added at once and stepped
to the end; the engine's own timestamps give each request's time to first token, and each step is
timed around `engine.step()`:

    step        1         2    3    ...   n      (B = 2 prompts that fit one step's budget)
    request a   prefill   d    d    ...   d      prefill: gives each request its first token
    request b   prefill   d    d    ...   d      d: one more token each, B per step
                `- TTFT -'`---- decode steps -----'

Decode tokens/s = B x decode steps / their summed time, where a decode step is one in which every
request decoded exactly one token: steps that still prefill some request (chunked prefill of a
large batch) or after some request finished are left out. Each figure is the median over
`repeats` runs after one short warm-up run; every run is kept in the dict.

Bandwidth: a copy `dst.copy_(src)` of a buffer several times the last-level cache, best of a few,
counting read + write bytes, on the same device in the same process. Utilisation of a decode step
= the bytes it must read (`decode_read_bytes`: every weight once, B embedding rows, the K/V of
every context token) x steps/s / that bandwidth. When those bytes fit in the last-level cache,
the weights may be read from cache, not memory, and utilisation can exceed 100% (flagged).

The byte counts, RSS and bandwidth are eval/memory.py's; a server is timed on the client by
eval/speed_url.py with the same keys (memory and bandwidth None).

What this module does not know: the results JSON (the caller stores the dict under "speed"),
CLI flags, model dirs (it takes a model in memory, or a URL).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from fastserve.errors import ConfigError
from fastserve.eval.memory import (
    GB,
    decode_read_bytes,
    kernel_cache_bytes,
    measure_bandwidth,
    memory_stats,
    sync,
    weights_bytes,
)

__all__ = [
    "check_counts",
    "measure_speed",
    "median_of",
    "resolve_lengths",
    "special_ids",
    "speed_options",
    "speed_table",
]

DEFAULT_PROMPT_LEN = 128  # clipped so that prompt + decode fits the model's context
DEFAULT_DECODE_TOKENS = 64  # at most half the context
DEFAULT_BATCH_SIZES = (1, 16)
DEFAULT_STEP_TOKENS = 512  # EngineConfig's (and `fastserve serve`'s) max_num_batched_tokens
WARMUP_TOKENS = 4  # new tokens of the warm-up run before each batch size's timed runs
BLOCK_SIZE = 16
BANDWIDTH_REPEATS = 5


# ---- settings ----------------------------------------------------------------------------------


def resolve_lengths(
    max_len: int | None, prompt_len: int | None, decode_tokens: int | None
) -> tuple[int, int]:
    """(prompt_len, decode_tokens): defaults clipped to the context `max_len` (None: unknown);
    values given must be >= 1 (decode >= 2: one token comes from the prefill) and fit together."""
    for name, value, low in (("prompt_len", prompt_len, 1), ("decode_tokens", decode_tokens, 2)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}.")
    if decode_tokens is None:
        decode_tokens = DEFAULT_DECODE_TOKENS
        if max_len is not None:
            decode_tokens = max(2, min(decode_tokens, max_len // 2))
    if prompt_len is None:
        prompt_len = DEFAULT_PROMPT_LEN
        if max_len is not None:
            prompt_len = max(1, min(prompt_len, max_len - decode_tokens))
    if max_len is not None and prompt_len + decode_tokens > max_len:
        raise ConfigError(
            f"prompt_len {prompt_len} + decode_tokens {decode_tokens} exceed the model's context "
            f"of {max_len} tokens."
        )
    return prompt_len, decode_tokens


SPEED_OPTIONS = ("prompt_len", "decode_tokens", "batch_sizes", "repeats")


def speed_options(speed) -> dict[str, Any] | None:
    """`evaluate(speed=...)`: False / None -> None (no speed run), True -> {} (the defaults), a
    dict of SPEED_OPTIONS -> a checked copy (batch_sizes: concurrency for a server)."""
    if speed is None or speed is False:
        return None
    if speed is True:
        return {}
    if not isinstance(speed, dict):
        raise ConfigError(f"speed must be True, False or a dict of {SPEED_OPTIONS}, got {speed!r}.")
    unknown = sorted(set(speed) - set(SPEED_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown speed option(s) {unknown}; use {', '.join(SPEED_OPTIONS)}.")
    options = {k: v for k, v in speed.items() if v is not None}
    if "batch_sizes" in options or "repeats" in options:
        sizes = check_counts(
            options.get("batch_sizes", DEFAULT_BATCH_SIZES), options.get("repeats", 3)
        )
        if "batch_sizes" in options:
            options["batch_sizes"] = sizes
    resolve_lengths(None, options.get("prompt_len"), options.get("decode_tokens"))
    return options


def check_counts(batch_sizes, repeats: int, name: str = "batch size") -> tuple[int, ...]:
    sizes = tuple(batch_sizes)
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise ConfigError(f"every {name} must be an integer >= 1, got {list(sizes)}.")
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}.")
    return tuple(sorted(set(sizes)))


# ---- the engine runs -------------------------------------------------------------------------


@dataclass
class BatchRun:
    """What one batch of requests, added at once and stepped to the end, measured."""

    batch_size: int
    ttft_s: list[float]  # per request: add_request -> its first token (the engine's clock)
    prefill_s: float  # start of the first step -> end of the step giving the last first token
    decode_steps: int  # steps in which every request decoded exactly one token
    decode_s: float  # their summed wall time
    context_tokens: int  # sum over those steps and requests of the positions attended
    wall_s: float  # start of the first step -> the last request finished
    output_tokens: int  # tokens in the requests' final outputs


def speed_engine(model, tokenizer, max_batch: int, max_len: int, step_tokens: int, device):
    """fcfs, prefix caching off, no host tier, a KV pool holding `max_batch` sequences of
    `max_len` tokens, at most `step_tokens` tokens per step."""
    from fastserve.engine import EngineConfig, LLMEngine

    blocks = max_batch * (-(-max_len // BLOCK_SIZE) + 1)
    config = EngineConfig(
        policy="fcfs",
        num_kv_blocks=blocks,
        block_size=BLOCK_SIZE,
        swap_space=0,
        preemption_mode="recompute",
        max_num_seqs=max_batch,
        max_num_batched_tokens=step_tokens,
        enable_prefix_caching=False,
        device=str(device),
    )
    return LLMEngine(model, tokenizer, config)


def special_ids(tokenizer) -> set[int]:
    ids = (getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id"))
    return {i for i in ids if i is not None}


def random_prompts(n: int, length: int, vocab_size: int, exclude: set[int], seed: int):
    """n seeded prompts of `length` random token ids (the serving benchmark's workload)."""
    from fastserve.eval.loadgen import random_requests

    specs = random_requests(n, length, 1, vocab_size=vocab_size, exclude_ids=exclude, seed=seed)
    return [s.prompt for s in specs]


def run_batch(engine, prompts: list[list[int]], max_tokens: int, device, tag: str) -> BatchRun:
    """Add every prompt at once (greedy, ignore_eos, max_tokens) and step until all finish."""
    from fastserve.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    counts = dict.fromkeys(ids, 0)
    finals = {}
    prefill_s, decode_steps, decode_s, context_tokens = None, 0, 0.0, 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        before = dict(counts)
        t0 = time.perf_counter()
        outs = engine.step()
        sync(device)
        t1 = time.perf_counter()
        for out in outs:
            counts[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                finals[out.request_id] = out
        if all(before[r] >= 1 and counts[r] == before[r] + 1 for r in ids):
            decode_steps += 1
            decode_s += t1 - t0
            # the step computes each sequence's last token, attending over all its positions
            context_tokens += sum(len(p) + before[r] for r, p in zip(ids, prompts))
        if prefill_s is None and min(counts.values()) >= 1:
            prefill_s = t1 - start
    wall_s = time.perf_counter() - start
    for rid in ids:
        o = finals[rid].outputs[0]
        if o.finish_reason != "length" or len(o.token_ids) != max_tokens:
            raise RuntimeError(
                f"speed run {rid}: {len(o.token_ids)} of {max_tokens} tokens, finished with "
                f"{o.finish_reason} ({o.stop_reason})"
            )
    return BatchRun(
        batch_size=len(prompts),
        ttft_s=[finals[r].metrics.ttft_s for r in ids],
        prefill_s=prefill_s,
        decode_steps=decode_steps,
        decode_s=decode_s,
        context_tokens=context_tokens,
        wall_s=wall_s,
        output_tokens=sum(len(finals[r].outputs[0].token_ids) for r in ids),
    )


def _run_record(run: BatchRun, prompt_len: int) -> dict[str, Any]:
    b, steps = run.batch_size, run.decode_steps
    timed = b * steps
    return {
        "ttft_mean_s": statistics.fmean(run.ttft_s),
        "ttft_max_s": max(run.ttft_s),
        "prefill_time_s": run.prefill_s,
        "prefill_tokens_per_s": b * prompt_len / run.prefill_s,
        "decode_steps": steps,
        "decode_tokens_timed": timed,
        "decode_time_s": run.decode_s,
        "decode_tokens_per_s": timed / run.decode_s if steps else None,
        "ms_per_step": 1e3 * run.decode_s / steps if steps else None,
        "mean_context_len": run.context_tokens / timed if steps else None,
        "wall_time_s": run.wall_s,
        "output_tokens": run.output_tokens,
    }


def median_of(records: list[dict], key: str):
    """The median of a key over runs (counts: the lower median, so they stay whole numbers)."""
    values = [r[key] for r in records if r[key] is not None]
    if not values:
        return None
    return (
        statistics.median_low(values) if isinstance(values[0], int) else statistics.median(values)
    )


def _batch_entry(model, batch_size, runs, prompt_len, decode_tokens, bandwidth) -> dict:
    records = [_run_record(r, prompt_len) for r in runs]
    entry: dict[str, Any] = {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "repeats": len(runs),
    }
    for key in ("ttft_mean_s", "ttft_max_s", "prefill_time_s", "prefill_tokens_per_s"):
        entry[key] = median_of(records, key)
    for key in ("decode_steps", "decode_tokens_timed", "decode_time_s", "decode_tokens_per_s"):
        entry[key] = median_of(records, key)
    for key in ("ms_per_step", "mean_context_len"):
        entry[key] = median_of(records, key)
    entry["read_bytes_per_step"] = entry["read_gb_per_s"] = entry["bandwidth_utilization"] = None
    if entry["ms_per_step"] is not None:
        read = decode_read_bytes(model, batch_size, entry["mean_context_len"])
        entry["read_bytes_per_step"] = read
        entry["read_gb_per_s"] = read["total_bytes"] / (entry["ms_per_step"] / 1e3) / GB
        entry["bandwidth_utilization"] = entry["read_gb_per_s"] / bandwidth["gb_per_s"]
    entry["runs"] = records
    return entry


def measure_speed(
    model,
    tokenizer,
    *,
    prompt_len: int | None = None,
    decode_tokens: int | None = None,
    batch_sizes=DEFAULT_BATCH_SIZES,
    repeats: int = 3,
    seed: int = 0,
    device=None,
    max_num_batched_tokens: int | None = None,
    bandwidth_bytes: int | None = None,
    progress=None,
) -> dict[str, Any]:
    """Prefill, time to first token and decode speed of `model` through the serving engine, its
    memory, and the share of the measured memory bandwidth its decode steps use (module
    docstring). Defaults: prompt 128 and 64 new tokens, clipped to the model's context; the
    serving token budget per step, max(512, prompt_len) (so one prompt prefills in one step;
    a batch of prompts is chunked as a server would); `progress`: a rich Progress."""
    import torch

    device = torch.device(device) if device is not None else model.device
    prompt_len, decode_tokens = resolve_lengths(
        model.config.max_position_embeddings, prompt_len, decode_tokens
    )
    sizes = check_counts(batch_sizes, repeats)
    step_tokens = max_num_batched_tokens or max(DEFAULT_STEP_TOKENS, prompt_len)
    if not isinstance(step_tokens, int) or step_tokens < max(sizes):
        raise ConfigError(
            f"max_num_batched_tokens must be an integer >= the largest batch size {max(sizes)} "
            f"(a decode step computes one token per sequence), got {step_tokens!r}."
        )
    wall_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = speed_engine(
        model, tokenizer, max(sizes), prompt_len + decode_tokens, step_tokens, device
    )
    vocab, exclude = model.config.vocab_size, special_ids(tokenizer)
    task = None
    if progress is not None:
        task = progress.add_task("speed", total=(1 + len(sizes)) * (repeats + 1))

    def runs(batch: int, max_tokens: int, count: int, tag: str) -> list[BatchRun]:
        out = []
        for k in range(count):
            prompts = random_prompts(batch, prompt_len, vocab, exclude, seed=seed + 1000 * k)
            out.append(run_batch(engine, prompts, max_tokens, device, f"{tag}-{k}"))
            if task is not None:
                progress.update(task, advance=1)
        return out

    runs(1, 1, 1, "warmup-prefill")
    prefill_runs = runs(1, 1, repeats, "prefill")
    batch_runs = {}
    for b in sizes:
        runs(b, min(decode_tokens, WARMUP_TOKENS), 1, f"warmup-{b}")
        batch_runs[b] = runs(b, decode_tokens, repeats, f"batch{b}")
    memory = memory_stats(device)
    memory["kv_cache_bytes"] = sum(
        t.numel() * t.element_size() for t in [*engine.runner.k_caches, *engine.runner.v_caches]
    )
    memory["note"] = "peak_rss_bytes is the process's lifetime peak (getrusage ru_maxrss)"
    generated = engine.num_generation_tokens
    engine = None  # free the KV pool before the bandwidth buffers
    bandwidth = measure_bandwidth(device, bandwidth_bytes, BANDWIDTH_REPEATS)

    prefill_times = [r.prefill_s for r in prefill_runs]
    batches = [
        _batch_entry(model, b, batch_runs[b], prompt_len, decode_tokens, bandwidth) for b in sizes
    ]
    read_b1 = decode_read_bytes(model, 1, prompt_len + decode_tokens / 2)
    llc = bandwidth["llc_bytes"]
    fits = llc is not None and read_b1["weights_bytes"] <= llc
    bandwidth["weights_fit_in_llc"] = fits
    if fits:
        bandwidth["note"] = (
            "the weights fit in the last-level cache: decode steps may read them from cache, "
            "so utilisation can exceed 100%"
        )
    return {
        "kind": "engine",
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "settings": {
            "prompt_len": prompt_len,
            "decode_tokens": decode_tokens,
            "batch_sizes": list(sizes),
            "repeats": repeats,
            "seed": seed,
            "warmup_decode_tokens": min(decode_tokens, WARMUP_TOKENS),
            "policy": "fcfs",
            "enable_prefix_caching": False,
            "max_num_batched_tokens": step_tokens,
            "block_size": BLOCK_SIZE,
            "sampling": "greedy, ignore_eos",
        },
        "prefill": {
            "prompt_len": prompt_len,
            "repeats": repeats,
            "time_s": statistics.median(prefill_times),
            "tokens_per_s": statistics.median(prompt_len / t for t in prefill_times),
            "ttft_s": statistics.median(r.ttft_s[0] for r in prefill_runs),
            "runs": [{"time_s": r.prefill_s, "ttft_s": r.ttft_s[0]} for r in prefill_runs],
        },
        "batches": batches,
        "weights": {
            "weights_bytes": weights_bytes(model),
            "kernel_cache_bytes": kernel_cache_bytes(model),
            "decode_read_bytes_batch1": read_b1,
        },
        "memory": memory,
        "bandwidth": bandwidth,
        "engine_generated_tokens": generated,
        "wall_time_s": time.perf_counter() - wall_start,
    }


# ---- the table -------------------------------------------------------------------------------


def _fmt(value, spec: str = ",.1f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def speed_table(speed: dict[str, Any]):
    """A rich table of `measure_speed` / `measure_url_speed`: a row per batch size (concurrency
    for a server), and a caption with prefill, weights, peak RSS and the measured bandwidth."""
    from rich import box
    from rich.table import Table

    s = speed["settings"]
    server = speed["kind"] == "server"
    where = f"{speed['url']}, {s['prompt_format']} prompts" if server else speed["device"]
    table = Table(
        title=f"Speed ({where}): prompt {s['prompt_len']} tokens, {s['decode_tokens']} new "
        f"tokens, median of {s['repeats']} runs",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    heads = [
        "concurrency" if server else "batch",
        "prefill tok/s",
        "TTFT ms mean / max",
        "decode tok/s",
        "TPOT ms" if server else "ms/step",
        "GB/s read",
        "% of bandwidth",
    ]
    for i, head in enumerate(heads):
        table.add_column(head, justify="left" if i == 0 else "right")
    for b in speed["batches"]:
        table.add_row(
            str(b["batch_size"]),
            _fmt(b["prefill_tokens_per_s"], ",.0f"),
            f"{_fmt(b['ttft_mean_s'], scale=1e3)} / {_fmt(b['ttft_max_s'], scale=1e3)}",
            _fmt(b["decode_tokens_per_s"]),
            _fmt(b["ms_per_step"], ".2f"),
            _fmt(b["read_gb_per_s"], ".2f"),
            _fmt(b["bandwidth_utilization"], ".1f", 100),
        )
    p = speed["prefill"]
    lines = [
        f"prefill of 1 x {p['prompt_len']} tokens: {_fmt(p['tokens_per_s'], ',.0f')} tok/s, "
        f"TTFT {_fmt(p['ttft_s'], scale=1e3)} ms"
    ]
    if server:
        lines.append(speed["note"])
    else:
        w, m, bw = speed["weights"], speed["memory"], speed["bandwidth"]
        read = w["decode_read_bytes_batch1"]["weights_bytes"]
        lines.append(
            f"weights {_size(w['weights_bytes'])} (a decode step reads {_size(read)} "
            "of them + embedding rows + K/V)"
        )
        mem = f"peak RSS {_size(m['peak_rss_bytes'])} (process lifetime)"
        if m["cuda_peak_allocated_bytes"] is not None:
            mem += f", peak CUDA allocated {_size(m['cuda_peak_allocated_bytes'])}"
        lines.append(f"{mem}; KV pool {_size(m['kv_cache_bytes'])}")
        bw_line = f"bandwidth {bw['gb_per_s']:.1f} GB/s (copy of {_size(bw['buffer_bytes'])})"
        if bw["llc_bytes"] is not None:
            bw_line += f"; last-level cache {_size(bw['llc_bytes'])}"
        if bw["weights_fit_in_llc"]:
            bw_line += ": the weights fit in it, so % of bandwidth can exceed 100"
        lines.append(bw_line)
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table
