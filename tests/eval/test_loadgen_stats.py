"""Serving-benchmark statistics, arrival times and workloads (no server needed)."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from fastserve.errors import ConfigError, DataError
from fastserve.eval.loadgen import (
    BenchConfig,
    arrival_times,
    build_workload,
    load_dataset,
    pick_requests,
    random_requests,
)
from fastserve.eval.loadgen_stats import (
    RequestResult,
    describe_ms,
    percentile,
    summarize,
    tpot_s,
)

# ---- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0, 5, 50, 95, 99, 100])
def test_percentile_matches_numpy(n, q):
    values = np.random.default_rng(n).exponential(size=n).tolist()
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_tpot_formula_and_undefined_cases():
    r = RequestResult(ok=True, output_len=6, ttft_s=0.1, e2e_s=0.6)
    assert tpot_s(r) == pytest.approx((0.6 - 0.1) / 5)
    assert tpot_s(RequestResult(ok=True, output_len=1, ttft_s=0.1, e2e_s=0.2)) is None
    assert tpot_s(RequestResult(ok=False, output_len=6, ttft_s=0.1, e2e_s=0.6)) is None
    assert tpot_s(RequestResult(ok=True, output_len=6, ttft_s=None, e2e_s=0.6)) is None


def test_describe_ms_matches_numpy():
    values = np.random.default_rng(3).gamma(2.0, 0.05, size=37)
    out = describe_ms("ttft", values.tolist())
    ms = values * 1000
    assert out["mean_ttft_ms"] == pytest.approx(ms.mean())
    assert out["median_ttft_ms"] == pytest.approx(np.median(ms))
    assert out["std_ttft_ms"] == pytest.approx(ms.std())
    assert out["p95_ttft_ms"] == pytest.approx(np.percentile(ms, 95))
    assert out["p99_ttft_ms"] == pytest.approx(np.percentile(ms, 99))
    assert set(describe_ms("itl", []).values()) == {None}


def test_summarize_throughput_and_per_request_metrics():
    rng = np.random.default_rng(0)
    results = []
    for i in range(20):
        n_out = int(rng.integers(1, 9))
        ttft = float(rng.uniform(0.01, 0.2))
        itl = rng.uniform(0.001, 0.02, size=n_out - 1).tolist()
        results.append(
            RequestResult(
                ok=True,
                prompt_len=10 + i,
                output_len=n_out,
                ttft_s=ttft,
                itl_s=itl,
                e2e_s=ttft + sum(itl),
            )
        )
    results.append(RequestResult(ok=False, prompt_len=5, output_len=3, e2e_s=9.0, error="boom"))
    duration = 4.0
    m = summarize(results, duration)
    done = results[:-1]
    assert m["completed"] == 20 and m["failed"] == 1
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_len for r in done)
    assert m["total_input_tokens"] == total_in and m["total_output_tokens"] == total_out
    assert m["request_throughput"] == pytest.approx(20 / duration)
    assert m["output_throughput"] == pytest.approx(total_out / duration)
    assert m["total_token_throughput"] == pytest.approx((total_in + total_out) / duration)
    # independent float64 reference of every metric family (the failed request is left out)
    ttft = np.array([r.ttft_s for r in done]) * 1000
    e2e = np.array([r.e2e_s for r in done]) * 1000
    itl = np.array([g for r in done for g in r.itl_s]) * 1000
    tpot = np.array([(r.e2e_s - r.ttft_s) / (r.output_len - 1) for r in done if r.output_len >= 2])
    assert m["mean_ttft_ms"] == pytest.approx(ttft.mean())
    assert m["p99_e2el_ms"] == pytest.approx(np.percentile(e2e, 99))
    assert m["median_itl_ms"] == pytest.approx(np.median(itl))
    assert m["mean_tpot_ms"] == pytest.approx(tpot.mean() * 1000)
    assert m["p95_tpot_ms"] == pytest.approx(np.percentile(tpot * 1000, 95))
    # with evenly spaced tokens TPOT equals the mean ITL
    even = RequestResult(ok=True, output_len=5, ttft_s=0.1, itl_s=[0.02] * 4, e2e_s=0.18)
    m1 = summarize([even], 1.0)
    assert m1["mean_tpot_ms"] == pytest.approx(m1["mean_itl_ms"]) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        summarize(results, 0.0)


# ---- arrivals -----------------------------------------------------------------------------------


def test_arrivals_inf_rate_all_at_once():
    assert arrival_times(5, math.inf) == [0.0] * 5


@pytest.mark.parametrize("rate", [2.0, 50.0])
def test_poisson_arrivals_mean_rate_and_exponential_gaps(rate):
    n = 20000
    times = arrival_times(n, rate, burstiness=1.0, seed=7)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:]))
    gaps = np.diff(times)
    # mean rate within 3% (the std error of the mean gap is 1/sqrt(n) ~ 0.7%)
    assert (n - 1) / times[-1] == pytest.approx(rate, rel=0.03)
    # exponential gaps: CV = 1
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert arrival_times(100, rate, seed=7) == times[:100]  # seeded: reproducible
    assert arrival_times(100, rate, seed=8) != times[:100]


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_mean_and_sets_variance(burstiness):
    rate, n = 10.0, 40000
    gaps = np.diff(arrival_times(n, rate, burstiness=burstiness, seed=1))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.04)
    # gamma(shape=B, scale=1/(R*B)): variance = 1 / (B * R^2)
    assert gaps.var() == pytest.approx(1 / (burstiness * rate**2), rel=0.1)


def test_arrivals_reject_bad_rates():
    with pytest.raises(ValueError):
        arrival_times(3, 0.0)
    with pytest.raises(ValueError):
        arrival_times(3, 1.0, burstiness=0.0)


# ---- workloads ----------------------------------------------------------------------------------


def test_random_requests_exact_lengths_and_vocab():
    specs = random_requests(50, 8, 6, vocab_size=20, exclude_ids={0, 1, 2}, seed=3)
    assert len(specs) == 50
    for s in specs:
        assert len(s.prompt) == s.prompt_len == 8 and s.output_len == 6
        assert all(isinstance(t, int) and 3 <= t < 20 for t in s.prompt)
    assert len({tuple(s.prompt) for s in specs}) == 50  # not the same prompt over and over
    again = random_requests(50, 8, 6, vocab_size=20, exclude_ids={0, 1, 2}, seed=3)
    assert [s.prompt for s in again] == [s.prompt for s in specs]


def test_random_requests_range_ratio_spreads_lengths():
    specs = random_requests(400, 100, 20, range_ratio=0.5, vocab_size=256, seed=0)
    in_lens = [s.prompt_len for s in specs]
    out_lens = [s.output_len for s in specs]
    assert min(in_lens) >= 50 and max(in_lens) <= 150
    assert min(out_lens) >= 10 and max(out_lens) <= 30
    assert statistics.mean(in_lens) == pytest.approx(100, rel=0.05)
    assert max(in_lens) - min(in_lens) > 80  # really spread, not constant


def test_random_requests_as_text_for_chat():
    specs = random_requests(3, 5, 4, vocab_size=256, seed=0, as_text=True)
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == 5 for s in specs)
    assert all(s.prompt_len is None for s in specs)


def test_jsonl_dataset(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"prompt": "hello there", "output_len": 5})
        + "\n\n"
        + json.dumps({"prompt": [5, 6, 7], "output_len": 2})
        + "\n"
    )
    specs = load_dataset(f)
    assert [(s.prompt, s.prompt_len, s.output_len) for s in specs] == [
        ("hello there", None, 5),
        ([5, 6, 7], 3, 2),
    ]
    assert [s.output_len for s in load_dataset(f, output_len=9)] == [9, 9]  # override


class _WordTokenizer:
    """One token per whitespace-separated word (the loader only calls encode/decode)."""

    def encode(self, text):
        return list(range(len(text.split())))

    def decode(self, ids):
        return " ".join("w" for _ in ids)


def test_sharegpt_dataset(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "a b c"}, {"from": "gpt", "value": "x y"}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},  # skipped
        {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": "q r"},
                {"from": "gpt", "value": "one two three four"},
                {"from": "human", "value": "later"},
            ]
        },
    ]
    f = tmp_path / "sharegpt.json"
    f.write_text(json.dumps(data))
    specs = load_dataset(f, tokenizer=_WordTokenizer())
    assert [(s.prompt, s.prompt_len, s.output_len) for s in specs] == [
        ("a b c", 3, 2),
        ("q r", 2, 4),
    ]
    with pytest.raises(DataError, match="--tokenizer"):
        load_dataset(f)
    assert [s.output_len for s in load_dataset(f, output_len=7)] == [7, 7]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "empty"),
        ('{"prompt": "a", "output_len": 3}\n{not json\n', r"d\.jsonl:2: not valid JSON"),
        ('{"text": "a"}\n', r'd\.jsonl:1: expected an object with a "prompt"'),
        ('{"prompt": "", "output_len": 3}\n', "prompt"),
        ('{"prompt": [1, "x"], "output_len": 3}\n', "token ids"),
        ('{"prompt": "a", "output_len": 0}\n', "positive integer"),
        ('{"prompt": "a", "output_len": "3"}\n', "positive integer"),
        ('{"prompt": "a"}\n', "output_len"),
        ("[1, 2]", "conversations"),
        ('[{"conversations": [}]', "not valid JSON"),
    ],
)
def test_bad_dataset_files_give_clear_errors(tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset(f, tokenizer=_WordTokenizer())


def test_missing_or_binary_dataset(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        load_dataset(tmp_path / "nope.jsonl")
    f = tmp_path / "bin.jsonl"
    f.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(DataError, match="UTF-8"):
        load_dataset(f)
    f.write_text(json.dumps([{"conversations": []}]))
    with pytest.raises(DataError, match="no usable entries"):
        load_dataset(f, output_len=3)


def test_pick_requests_cycles_and_shuffles_reproducibly():
    entries = random_requests(3, 2, 2, seed=0)
    picked = pick_requests(entries, 7)
    assert [picked[i] is entries[i % 3] for i in range(7)] == [True] * 7
    many = random_requests(30, 2, 2, seed=0)
    a = pick_requests(many, 30, seed=1, shuffle=True)
    assert a == pick_requests(many, 30, seed=1, shuffle=True) and a != many
    assert sorted(map(id, a)) == sorted(map(id, many))


def test_build_workload_defaults_and_config_checks(tmp_path):
    specs, random_workload = build_workload(BenchConfig(num_prompts=4))
    assert random_workload and [s.prompt_len for s in specs] == [128] * 4
    assert all(max(s.prompt) < 256 for s in specs)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": [1, 2], "output_len": 3}) + "\n")
    with pytest.raises(DataError, match="--tokenizer"):  # token ids cannot be chat messages
        build_workload(BenchConfig(dataset=str(f), endpoint="/v1/chat/completions"))
    specs, random_workload = build_workload(BenchConfig(dataset=str(f), num_prompts=3))
    assert not random_workload and [s.prompt for s in specs] == [[1, 2]] * 3
    for bad in (
        BenchConfig(num_prompts=0),
        BenchConfig(request_rate=-1.0),
        BenchConfig(burstiness=0.0),
        BenchConfig(range_ratio=1.0),
        BenchConfig(endpoint="/v1/embeddings"),
        BenchConfig(url="127.0.0.1:8000"),
        BenchConfig(dataset=str(f), input_len=8),
        BenchConfig(max_concurrency=0),
    ):
        with pytest.raises(ConfigError):
            bad.validate()


def test_random_workload_with_a_tokenizer(tmp_path):
    from fastserve.data.tokenizer import Tokenizer

    texts = ["the cat sat on a mat while server tokens queue"] * 50
    tok = Tokenizer.train(texts, vocab_size=280)
    tok.save_pretrained(tmp_path / "tok")
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    config = BenchConfig(tokenizer=str(tmp_path / "tok"), num_prompts=40, input_len=30)
    specs, _ = build_workload(config)
    ids = {t for s in specs for t in s.prompt}
    assert max(ids) < tok.vocab_size and not ids & specials
    assert max(ids) >= 256  # the tokenizer's size, not the 256 default, bounds the ids
    # chat endpoint: the same ids decoded to text
    config.endpoint = "/v1/chat/completions"
    chat_specs, _ = build_workload(config)
    assert [s.prompt for s in chat_specs] == [tok.decode(s.prompt) for s in specs]
