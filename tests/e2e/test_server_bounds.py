"""Hostile input against a real `fastserve serve` process: every bound answers 400/413 in
OpenAI's error shape naming the field, the engine keeps serving everyone else (the same greedy
output before and after), a request that fails inside a step fails alone, and an engine that dies
of a failure no request explains makes /health say so and the process exit 1."""

from __future__ import annotations

import concurrent.futures
import sys
from pathlib import Path

import httpx
import pytest
from server_helpers import ServerProcess, make_model_dir, running_server, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LAUNCHER = [sys.executable, str(Path(__file__).with_name("fault_launcher.py"))]
PROBE = {"prompt": "the cat sat", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def bounds_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("server-bounds") / "model")


@pytest.fixture(scope="module")
def server(bounds_model_dir):
    with running_server(
        bounds_model_dir,
        "--max-body-size",
        "256KiB",
        "--max-queued-requests",
        "8",
        "--max-request-tokens",
        "4000",
        launcher=[*LAUNCHER, "poison-seed"],
    ) as proc:
        yield proc


def post(server, body, path="/v1/completions", **kwargs) -> httpx.Response:
    return httpx.post(server.base_url + path, timeout=60, **({"json": body} | kwargs))


def probe_text(server) -> str:
    r = post(server, PROBE)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def assert_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err


# (body, param) pairs that must each get a 400 naming `param`
BAD_FIELDS = [
    ({"top_k": 100000000000000000000, "top_p": 0.9}, "top_k"),  # the reported crash
    ({"top_k": 301}, "top_k"),  # the tiny model's vocabulary has 300 tokens
    ({"top_k": -2}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"n": 129}, "n"),
    ({"n": 10**40}, "n"),
    ({"best_of": 3, "n": 2}, "best_of"),
    ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"min_tokens": 2**64, "max_tokens": 8}, "min_tokens"),
    ({"stop": ["x"] * 65}, "stop"),
    ({"stop": ["x" * 1025]}, "stop"),
    ({"stop_token_ids": [300]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"temperature": 1e999}, "temperature"),  # parses as inf
    ({"priority": 2**63}, "priority"),
    ({"prompt": [[1, 2]] * 1025}, "prompt"),
    ({"prompt": [1, 2, 300]}, "prompt"),  # a token id outside the vocabulary
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": [[5]] * 3, "n": 3}, "n"),  # 9 sequences > --max-queued-requests 8
    ({"prompt": "x", "max_tokens": 1000, "n": 5}, "max_tokens"),  # > --max-request-tokens
    ({"prompt": [5] * 2049, "max_tokens": 1}, "prompt"),  # longer than the context
]


def test_every_bound_is_a_400_naming_the_field_and_the_engine_keeps_serving(server):
    before = probe_text(server)
    for fields, param in BAD_FIELDS:
        body = {"prompt": "x", "max_tokens": 4, **fields}
        if "temperature" in fields:  # json.dumps writes inf as Infinity: send the literal 1e999
            r = post(
                server,
                None,
                content=b'{"prompt": "x", "max_tokens": 4, "temperature": 1e999}',
                headers={"content-type": "application/json"},
            )
        else:
            r = post(server, body)
        assert_error(r, 400, param)
    assert probe_text(server) == before
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200


def test_malformed_bodies_are_400_or_413(server):
    before = probe_text(server)
    raw = [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json.loads before
        b'{"prompt": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}",
        b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}",  # over Python's 4300-digit limit
        b'{"prompt": "x", "temperature": NaN}',
        b'{"prompt": "x", "max_tokens": 4',
        b"\xff\xfe not utf-8",
        b'"just a string"',
    ]
    for body in raw:
        r = post(server, None, content=body, headers={"content-type": "application/json"})
        assert_error(r, 400, None)
    r = post(server, {"prompt": "x" * 300_000, "max_tokens": 1})  # > --max-body-size 256KiB
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

    def chunks():  # no Content-Length: the limit applies to the bytes actually sent
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 10_000
        yield b'", "max_tokens": 1}'

    r = post(server, None, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert probe_text(server) == before


def test_a_request_that_fails_inside_a_step_fails_alone(server):
    before = probe_text(server)
    poisoned = {"prompt": "the cat", "max_tokens": 16, "temperature": 0.8, "seed": 666}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        healthy = [pool.submit(post, server, PROBE) for _ in range(6)]
        bad = [pool.submit(post, server, poisoned), pool.submit(post, server, poisoned | {"n": 2})]
        bad_stream = pool.submit(post, server, poisoned | {"stream": True})
        for f in healthy:
            assert f.result().status_code == 200
            assert f.result().json()["choices"][0]["text"] == before
        for f in bad:
            r = f.result()
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
            assert "IndexError" in r.json()["error"]["message"]
        stream = bad_stream.result()
        assert stream.status_code == 200  # the status was sent before the failing step
        events = [ln for ln in stream.text.splitlines() if ln.startswith("data: ")]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
    assert httpx.get(server.base_url + "/health", timeout=10).json() == {"status": "ok"}
    metrics = wait_for(lambda: (m := server.metrics())["fastserve:kv_cache_usage_perc"] == 0 and m)
    # the n=2 request: child 0 (seed 666) fails; child 1 (seed 667) is aborted with the request
    assert metrics['fastserve:request_success_total{finished_reason="error"}'] == 3
    assert metrics['fastserve:request_success_total{finished_reason="abort"}'] == 1
    assert metrics["fastserve:num_requests_running"] == 0
    assert probe_text(server) == before


def test_the_openapi_document_describes_the_request_bodies(server):
    doc = httpx.get(server.base_url + "/openapi.json", timeout=10).json()
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    ref = body["schema"]["$ref"].rsplit("/", 1)[-1]
    props = doc["components"]["schemas"][ref]["properties"]
    assert {"prompt", "max_tokens", "top_k", "seed", "n", "stream"} <= set(props)
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert chat["required"] is True
    assert "ErrorResponse" in doc["components"]["schemas"]


def test_a_dead_engine_fails_health_and_the_process_exits_1(bounds_model_dir, tmp_path):
    proc = ServerProcess(
        bounds_model_dir, launcher=[*LAUNCHER, "die-after-3"], log_path=tmp_path / "dead.log"
    )
    try:
        proc.wait_ready()
        r = post(proc, {"prompt": "the cat", "max_tokens": 50, "temperature": 0})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        assert proc.proc.wait(timeout=60) == 1
        assert "the engine died" in proc.log()
    finally:
        proc.stop()


def test_stream_events_survive_clients_that_split_on_unicode_line_breaks(server):
    """U+2028 / U+2029 / U+0085 are escaped in SSE JSON: httpx's aiter_lines (str.splitlines)
    would otherwise cut an event in two."""
    body = {"prompt": "a\u2028b\u2029c\u0085d", "max_tokens": 2, "echo": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"]]
    assert "".join(texts).startswith("a\u2028b\u2029c\u0085d")


def test_integers_follow_json_schema(server):
    """4.0 is an integer in JSON Schema (what the OpenAPI document promises); 4.5, "4" and true
    are not."""
    r = post(server, {"prompt": "the cat", "max_tokens": 4.0, "n": 1.0, "seed": 3.0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    for value in (4.5, "4", True):
        assert_error(post(server, {"prompt": "the cat", "max_tokens": value}), 400, "max_tokens")


def test_a_huge_text_prompt_does_not_stall_the_event_loop(bounds_model_dir, tmp_path):
    """A 10 MB text prompt takes the tokenizer seconds: it runs in a worker thread, so /health
    answers meanwhile (it waited for the whole tokenization when it ran on the event loop)."""
    import random
    import threading
    import time

    from tiny_models import WORDS

    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(2_000_000))  # ~10 MB, < 16 MiB default
    result = {}
    with running_server(bounds_model_dir, log_path=tmp_path / "huge.log") as proc:

        def send():
            start = time.monotonic()
            result["response"] = post(proc, {"prompt": text, "max_tokens": 1})
            result["seconds"] = time.monotonic() - start

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(1.0)  # the body is sent and being tokenized
        health = []
        while sender.is_alive() and len(health) < 20:
            start = time.monotonic()
            assert httpx.get(proc.base_url + "/health", timeout=60).status_code == 200
            health.append(time.monotonic() - start)
            time.sleep(0.1)
        sender.join()
        assert_error(result["response"], 400, "prompt")  # far longer than the context
        assert result["seconds"] > 2, result  # the tokenization really took a while
        assert len(health) >= 3 and max(health) < 0.5, (health, result["seconds"])
