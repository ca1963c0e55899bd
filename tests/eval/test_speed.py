"""`fastserve.eval.speed`: the decode byte counts against hand computations from the config
(dense, bf16, tied, int4 with zero points), weights bytes against the state dict, the engine
runs (every token counted was generated, rates equal tokens / seconds, TTFT within the run),
the bandwidth copy, bad settings, and a real `fastserve serve` process timed over HTTP."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from e2e.server_helpers import make_model_dir, running_server
from fastserve.errors import ConfigError
from fastserve.eval.memory import (
    bandwidth_buffer_bytes,
    current_rss_bytes,
    decode_read_bytes,
    last_level_cache_bytes,
    peak_rss_bytes,
    weights_bytes,
)
from fastserve.eval.speed import measure_speed, resolve_lengths, speed_table
from fastserve.eval.speed_url import measure_url_speed
from fastserve.model import LlamaForCausalLM
from fastserve.model.quantized import QuantScheme, quantize_model
from tiny_models import tiny_model, tiny_tokenizer

PROMPT, DECODE, BATCHES, REPEATS = 24, 10, (1, 4), 2


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def speed(tok):
    model = tiny_model(tok)
    return measure_speed(
        model,
        tok,
        prompt_len=PROMPT,
        decode_tokens=DECODE,
        batch_sizes=BATCHES,
        repeats=REPEATS,
        bandwidth_bytes=32 * 2**20,
    )


def linear_shapes(c) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's linears, from the config."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, i = c.hidden_size, c.intermediate_size
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def kv_bytes(c, elem: int, batch: int, context: float) -> int:
    return round(
        2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elem * context * batch
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_read_bytes_of_a_dense_model(tok, dtype):
    model = tiny_model(tok).to(dtype)
    c, elem = model.config, torch.empty((), dtype=dtype).element_size()
    layer = sum(o * i for o, i in linear_shapes(c)) + 2 * c.hidden_size  # + two norms
    weights = elem * (c.num_hidden_layers * layer + c.hidden_size + c.vocab_size * c.hidden_size)
    got = decode_read_bytes(model, batch_size=3, context_len=40.5)
    assert got == {
        "weights_bytes": weights,
        "embedding_rows_bytes": 3 * c.hidden_size * elem,
        "kv_bytes": kv_bytes(c, elem, 3, 40.5),
        "total_bytes": weights + 3 * c.hidden_size * elem + kv_bytes(c, elem, 3, 40.5),
    }


def test_a_tied_head_is_counted_once(tok):
    untied = tiny_model(tok)
    tied = LlamaForCausalLM(untied.config.replace(tie_word_embeddings=True))
    table = untied.config.vocab_size * untied.config.hidden_size * 4
    assert weights_bytes(tied) == weights_bytes(untied) - table
    # untied: the lm_head is read and the table is not; tied: the table is the lm_head
    assert decode_read_bytes(tied, 2, 10) == decode_read_bytes(untied, 2, 10)


def test_decode_read_bytes_of_an_int4_model(tok):
    model = tiny_model(tok)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantize_model(model, {n: scheme for n in names if n != "lm_head"})
    c = model.config
    # per linear: two 4-bit values a byte, a float32 scale and a uint8 zero point per group of 32
    layer = sum(o * i // 2 + o * (i // 32) * (4 + 1) for o, i in linear_shapes(c))
    layer += 2 * c.hidden_size * 4
    weights = c.num_hidden_layers * layer + 4 * (c.hidden_size + c.vocab_size * c.hidden_size)
    got = decode_read_bytes(model, batch_size=5, context_len=33)
    assert got["weights_bytes"] == weights
    assert got["kv_bytes"] == kv_bytes(c, 4, 5, 33)
    assert got["embedding_rows_bytes"] == 5 * c.hidden_size * 4


def state_dict_bytes(model) -> int:
    by_storage = {}  # a tied head appears twice in the state dict, on one storage
    for t in model.state_dict().values():
        by_storage[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(by_storage.values())


def test_weights_bytes_equal_the_state_dict(tok):
    from fastserve.compress import compress_model

    dense = tiny_model(tok)
    quant = tiny_model(tok)
    compress_model(quant, "w4a16", None)
    assert weights_bytes(dense) == state_dict_bytes(dense)
    assert weights_bytes(quant) == state_dict_bytes(quant)
    assert weights_bytes(quant) < weights_bytes(dense)


def test_every_counted_token_was_generated(speed):
    s = speed["settings"]
    assert (s["prompt_len"], s["decode_tokens"], s["repeats"]) == (PROMPT, DECODE, REPEATS)
    assert [b["batch_size"] for b in speed["batches"]] == list(BATCHES)
    for b in speed["batches"]:
        for run in b["runs"]:
            assert run["output_tokens"] == b["batch_size"] * DECODE
            # all prompts prefill in one step (4 x 24 <= 512 tokens), then every step decodes
            assert run["decode_steps"] == DECODE - 1
            assert run["decode_tokens_timed"] == b["batch_size"] * (DECODE - 1)
            assert run["mean_context_len"] == pytest.approx(PROMPT + DECODE / 2)
    warm = s["warmup_decode_tokens"]
    expected = (1 + REPEATS) * 1  # the prefill runs make one token each
    expected += sum(b * (warm + REPEATS * DECODE) for b in BATCHES)
    assert speed["engine_generated_tokens"] == expected  # the engine's own counter


def test_chunked_prefill_steps_are_not_decode_steps(tok):
    # 32 tokens a step: the 4 prompts of 24 tokens prefill over 3-4 steps while the first ones
    # already decode, and the first to start finish first: those steps are not steady state
    from rich.progress import Progress

    progress = Progress(disable=True)
    s = measure_speed(
        tiny_model(tok),
        tok,
        prompt_len=PROMPT,
        decode_tokens=DECODE,
        batch_sizes=(4,),
        repeats=1,
        max_num_batched_tokens=32,
        bandwidth_bytes=16 * 2**20,
        progress=progress,
    )
    (task,) = progress.tasks
    assert task.completed == task.total == 4  # (warm-up + 1 run) x (prefill, batch 4)
    (run,) = s["batches"][0]["runs"]
    assert run["output_tokens"] == 4 * DECODE
    assert 1 <= run["decode_steps"] < DECODE - 1
    assert run["decode_tokens_timed"] == 4 * run["decode_steps"]
    assert run["ttft_mean_s"] < run["ttft_max_s"]  # first tokens came in different steps
    with pytest.raises(ConfigError):
        measure_speed(tiny_model(tok), tok, batch_sizes=(16,), max_num_batched_tokens=8)


def test_rates_are_tokens_over_seconds(speed):
    for b in speed["batches"]:
        for run in b["runs"]:
            assert run["decode_time_s"] > 0 and run["prefill_time_s"] > 0
            assert run["decode_tokens_per_s"] == pytest.approx(
                run["decode_tokens_timed"] / run["decode_time_s"]
            )
            assert run["ms_per_step"] == pytest.approx(
                1e3 * run["decode_time_s"] / run["decode_steps"]
            )
            assert run["prefill_tokens_per_s"] == pytest.approx(
                b["batch_size"] * PROMPT / run["prefill_time_s"]
            )
            assert 0 < run["ttft_mean_s"] <= run["ttft_max_s"] <= run["wall_time_s"]
            assert run["decode_time_s"] < run["wall_time_s"]
        for key in ("decode_tokens_per_s", "ms_per_step", "ttft_max_s", "prefill_tokens_per_s"):
            assert b[key] == statistics.median(r[key] for r in b["runs"])
        read = b["read_bytes_per_step"]["total_bytes"]
        assert b["read_gb_per_s"] == pytest.approx(read / (b["ms_per_step"] / 1e3) / 1e9)
        assert b["bandwidth_utilization"] == pytest.approx(
            b["read_gb_per_s"] / speed["bandwidth"]["gb_per_s"]
        )
    p = speed["prefill"]
    assert len(p["runs"]) == REPEATS and all(r["time_s"] > 0 for r in p["runs"])
    assert p["tokens_per_s"] == statistics.median(PROMPT / r["time_s"] for r in p["runs"])
    assert p["ttft_s"] == statistics.median(r["ttft_s"] for r in p["runs"]) > 0


def test_memory_and_bandwidth(speed):
    bw, mem, w = speed["bandwidth"], speed["memory"], speed["weights"]
    assert bw["gb_per_s"] > 0
    assert bw["bytes_per_copy"] == 2 * bw["buffer_bytes"] == 2 * 32 * 2**20
    assert bw["gb_per_s"] == pytest.approx(bw["bytes_per_copy"] / bw["best_copy_s"] / 1e9)
    assert bw["weights_fit_in_llc"] == (
        bw["llc_bytes"] is not None
        and w["decode_read_bytes_batch1"]["weights_bytes"] <= bw["llc_bytes"]
    )
    assert mem["peak_rss_bytes"] >= mem["rss_bytes"] > w["weights_bytes"]
    assert mem["cuda_peak_allocated_bytes"] is None
    # the KV pool holds every sequence of the largest batch
    c = tiny_model(tiny_tokenizer()).config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    assert mem["kv_cache_bytes"] >= max(BATCHES) * (PROMPT + DECODE) * per_token


def test_speed_table_has_a_row_per_batch(speed):
    from rich.console import Console

    assert json.loads(json.dumps(speed)) == speed  # plain JSON for the results file
    table = speed_table(speed)
    assert table.row_count == len(BATCHES)
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "GB/s" in text and "peak RSS" in text and "prefill of 1 x 24 tokens" in text


def test_rss_is_in_bytes():
    before = current_rss_bytes()
    x = torch.ones(32 * 2**20)  # 128 MiB, written: resident
    grown = 120 * 2**20
    assert current_rss_bytes() >= before + grown
    assert peak_rss_bytes() >= before + grown
    del x


def test_bandwidth_buffer_and_cache_sizes():
    mib = 2**20
    assert bandwidth_buffer_bytes(None) == 256 * mib
    assert bandwidth_buffer_bytes(100 * mib) == 400 * mib  # 4 x the last-level cache
    assert bandwidth_buffer_bytes(480 * mib) == 1920 * mib
    assert bandwidth_buffer_bytes(1024 * mib) == 2048 * mib  # at most 2 GiB
    assert bandwidth_buffer_bytes(100 * mib, available_bytes=1024 * mib) == 128 * mib
    llc = last_level_cache_bytes("cpu")
    assert llc is None or llc >= 2**15


@pytest.mark.parametrize(
    "settings",
    [
        {"prompt_len": 0},
        {"decode_tokens": 1},
        {"batch_sizes": (0, 16)},
        {"batch_sizes": ()},
        {"repeats": 0},
        {"prompt_len": 100, "decode_tokens": 64},  # the tiny model's context is 128
    ],
)
def test_bad_settings_are_config_errors(tok, settings):
    with pytest.raises(ConfigError):
        measure_speed(tiny_model(tok), tok, **settings)


def test_defaults_are_clipped_to_the_context():
    assert resolve_lengths(None, None, None) == (128, 64)
    assert resolve_lengths(2048, None, None) == (128, 64)
    assert resolve_lengths(128, None, None) == (64, 64)  # decode at most half the context
    assert resolve_lengths(96, 16, None) == (16, 48)
    assert resolve_lengths(96, None, 10) == (86, 10)
    assert resolve_lengths(96, 90, 6) == (90, 6)  # values given are kept when they fit


@pytest.mark.e2e
def test_a_real_server(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    with running_server(model_dir, "--policy", "fcfs") as server:
        s = measure_url_speed(
            server.base_url,
            prompt_len=16,
            decode_tokens=6,
            concurrency=(1, 3),
            repeats=1,
            tokenizer=model_dir,
        )
    assert s["kind"] == "server" and s["memory"] is None and s["bandwidth"] is None
    assert s["settings"]["prompt_format"] == "token_ids" and s["settings"]["ignore_eos"]
    assert s["prefill"]["ttft_s"] > 0 and s["prefill"]["tokens_per_s"] > 0
    for b in s["batches"]:
        (run,) = b["runs"]
        assert run["output_tokens"] == [6] * b["batch_size"]  # ignore_eos: exactly max_tokens
        assert run["prompt_tokens_mean"] == 16
        assert 0 < run["ttft_mean_s"] <= run["ttft_max_s"] <= run["wall_time_s"]
        assert b["decode_tokens_per_s"] > 0 and b["tpot_mean_s"] > 0 and b["itl_mean_s"] > 0
        assert b["decode_tokens_per_s"] == pytest.approx(
            b["batch_size"] * b["per_request_decode_tokens_per_s"], rel=1e-9
        )
    assert speed_table(s).row_count == 2
    assert json.loads(json.dumps(s)) == s
