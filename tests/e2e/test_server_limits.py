"""`fastserve serve` limits and lifetime: API key, 429 on a full queue, SIGTERM drains requests."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest
from server_helpers import ServerProcess, make_model_dir, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def lim_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("server-limits") / "model")


@pytest.fixture(scope="module")
def guarded(lim_model_dir):
    """One sequence at a time, one waiting at most, an API key."""
    proc = ServerProcess(
        lim_model_dir,
        "--api-key",
        KEY,
        "--policy",
        "fcfs",
        "--max-num-seqs",
        "1",
        "--max-queued-requests",
        "1",
    )
    try:
        yield proc.wait_ready()
    finally:
        assert proc.stop() == 0, proc.log()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_is_enforced(guarded):
    url = guarded.base_url
    body = {"prompt": "the cat", "max_tokens": 2}
    for headers in ({}, auth("wrong"), {"Authorization": KEY}):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    r = httpx.post(url + "/v1/completions", json=body, headers=auth(), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(url + "/v1/models", headers=auth(), timeout=30).status_code == 200
    # probes stay open, as in vLLM
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert httpx.get(url + "/metrics", timeout=30).status_code == 200

    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="model", prompt="x", max_tokens=1)


def test_429_when_the_queue_is_full(guarded):
    url = guarded.base_url
    long = {"prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    a, b = httpx.Client(timeout=60, headers=auth()), httpx.Client(timeout=60, headers=auth())
    with a, b:
        with a.stream("POST", url + "/v1/completions", json=long) as ra:
            assert ra.status_code == 200
            wait_for(lambda: guarded.metrics()["fastserve:num_requests_running"] == 1)
            # B waits (max_num_seqs=1); its stream is opened in a thread since the 200 comes with
            # its first token
            b_status = {}

            def open_b():
                with b.stream("POST", url + "/v1/completions", json=long) as rb:
                    b_status["code"] = rb.status_code
                    for _ in rb.iter_lines():
                        break

            tb = threading.Thread(target=open_b, daemon=True)
            tb.start()
            wait_for(lambda: guarded.metrics()["fastserve:num_requests_waiting"] == 1)
            r = httpx.post(
                url + "/v1/completions",
                json={"prompt": "x", "max_tokens": 1},
                headers=auth(),
                timeout=30,
            )
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "queue_full"
        # A disconnected: B runs, streams its first token and leaves too
        tb.join(60)
        assert b_status.get("code") == 200
    m = wait_for(
        lambda: (
            (m := guarded.metrics())["fastserve:kv_cache_usage_perc"] == 0.0
            and m["fastserve:num_requests_running"] == 0
            and m
        )
    )
    assert m["fastserve:num_requests_waiting"] == 0
    ok = httpx.post(
        url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=auth(), timeout=30
    )
    assert ok.status_code == 200


def test_sigterm_finishes_in_flight_request_then_exits_0(lim_model_dir):
    proc = ServerProcess(lim_model_dir, "--shutdown-timeout", "60").wait_ready()
    body = {"prompt": [5, 6, 7], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    texts, reasons, done = [], [], []
    try:
        with httpx.stream("POST", proc.base_url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done.append(True)
                    break
                chunk = json.loads(line[6:])
                if not texts:
                    proc.proc.send_signal(signal.SIGTERM)  # mid-request
                for c in chunk["choices"]:
                    texts.append(c["text"])
                    reasons.append(c["finish_reason"])
        assert proc.proc.wait(60) == 0, proc.log()
    finally:
        proc.stop(signal.SIGKILL)
    assert done and reasons[-1] == "length"
    log = proc.log()
    finished = log.index("prompt_tokens=3 output_tokens=1500")  # the request ran to its end ...
    assert log.index("Shutting down") < finished  # ... after the server began to shut down
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.base_url + "/health", timeout=5)


def test_serve_cli_defaults_and_user_errors(lim_model_dir, tmp_path):
    import socket
    import subprocess
    import sys

    from fastserve.cli import SERVE_ENGINE_DEFAULTS
    from fastserve.engine.config import EngineConfig

    defaults = EngineConfig()
    assert {k: getattr(defaults, k) for k in SERVE_ENGINE_DEFAULTS} == SERVE_ENGINE_DEFAULTS

    def serve(*args):
        cmd = [sys.executable, "-m", "fastserve", "serve", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    missing = serve(str(tmp_path / "missing"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = serve(str(lim_model_dir), "--port", str(busy.getsockname()[1]))
    assert taken.returncode == 2 and "cannot listen" in taken.stderr
    bad = serve(str(lim_model_dir), "--port", "0", "--kv-cache-memory", "lots")
    assert bad.returncode == 2 and "kv_cache_memory" in bad.stderr
    for proc in (missing, taken, bad):
        assert "Traceback" not in proc.stderr
