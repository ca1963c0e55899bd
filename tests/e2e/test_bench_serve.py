"""`fastserve bench serve` as a user runs it, against a real `fastserve serve` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from server_helpers import ServerProcess, make_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

GEN_TOKENS = "fastserve:generation_tokens_total"
METRIC_KEYS = [
    f"{stat}_{name}_ms"
    for name in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "std", "p95", "p99")
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("bench_serve") / "model")
    srv = ServerProcess(model_dir, "--kv-cache-memory", "64MiB").wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "fastserve", "bench", "serve", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_serve_counts_and_metrics(server, tmp_path, endpoint):
    before = server.metrics()[GEN_TOKENS]
    out = tmp_path / "bench.json"
    proc = bench(
        "--url", server.base_url, "--endpoint", endpoint, "--num-prompts", "8",
        "--request-rate", "inf", "--input-len", "8", "--output-len", "6",
        "--result-json", str(out), "--label", "e2e", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "successful requests" in proc.stdout and "TTFT" in proc.stdout
    r = json.loads(out.read_text())
    assert r["completed"] == 8 and r["failed"] == 0, r["errors"]
    assert r["output_lens"] == [6] * 8  # ignore_eos: every request ran to max_tokens
    assert r["total_output_tokens"] == 48
    if endpoint == "/v1/completions":  # token-id prompts of exactly 8 tokens (server's usage)
        assert r["input_lens"] == [8] * 8 and r["total_input_tokens"] == 64
    else:  # text prompts through the chat template: longer than 8 tokens, counted by the server
        assert all(n > 8 for n in r["input_lens"])
    served = httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
    assert r["model_id"] == served and r["label"] == "e2e" and r["request_rate"] == "inf"
    for key in METRIC_KEYS:
        assert isinstance(r[key], float) and r[key] >= 0, key
    for ttft, itls, e2e in zip(r["ttfts"], r["itls"], r["e2els"]):
        assert 0 < ttft <= e2e and len(itls) <= 5 and all(g >= 0 for g in itls)
    assert r["mean_ttft_ms"] <= r["mean_e2el_ms"] and r["p99_ttft_ms"] <= r["p99_e2el_ms"] + 1e-9
    assert r["median_e2el_ms"] <= r["p95_e2el_ms"] <= r["p99_e2el_ms"]
    assert r["mean_tpot_ms"] > 0 and r["duration"] >= max(r["e2els"])
    assert r["request_throughput"] == pytest.approx(8 / r["duration"])
    assert r["output_throughput"] == pytest.approx(48 / r["duration"])
    # the server generated exactly what the client counted
    assert server.metrics()[GEN_TOKENS] - before == 48


def test_bench_serve_user_errors(server, tmp_path):
    proc = bench("--url", "http://127.0.0.1:9", "--num-prompts", "1")
    assert proc.returncode == 2 and "cannot reach" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    proc = bench("--url", server.base_url, "--dataset", str(bad))
    assert proc.returncode == 2 and "output_len" in proc.stderr
    # every request rejected by the server (prompt longer than the context): exit 2, one line
    proc = bench(
        "--url", server.base_url, "--num-prompts", "2", "--input-len", "5000",
        "--output-len", "2", "--no-progress", "--result-json", str(tmp_path / "f.json"),
    )  # fmt: skip
    assert proc.returncode == 2 and "all 2 requests failed" in proc.stderr
    assert "HTTP 400" in proc.stderr
    assert json.loads((tmp_path / "f.json").read_text())["failed"] == 2
