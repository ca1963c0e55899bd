"""The benchmark client against a minimal stdlib OpenAI-style server (not FastServe's).

The fake server streams `max_tokens` chunks DELAY_S apart, then a usage chunk and `data: [DONE]`,
so the client's TTFT / ITL / E2E, usage parsing, failures, auth and concurrency cap are checked
against what the server really did.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastserve.errors import FastServeError
from fastserve.eval.loadgen import BenchConfig, run_benchmark
from fastserve.eval.openai_client import SSEDecoder, discover_model

DELAY_S = 0.02
BAD_TOKEN = 13  # a prompt starting with this id gets a 400 OpenAI error
CUT_TOKEN = 14  # a prompt starting with this id gets a stream cut before [DONE]


class _FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the stream ends when the connection closes
    state: dict = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        key = self.state.get("api_key")
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._json(401, {"error": {"message": "bad key", "type": "auth", "code": 401}})
            return False
        return True

    def do_GET(self):
        if self._authorized():
            self._json(200, {"object": "list", "data": [{"id": "fake-model"}]})

    def do_POST(self):
        if not self._authorized():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        st = self.state
        with st["lock"]:
            st["payloads"].append(body)
            st["in_flight"] += 1
            st["max_in_flight"] = max(st["max_in_flight"], st["in_flight"])
        try:
            self._stream(body)
        finally:
            with st["lock"]:
                st["in_flight"] -= 1

    def _stream(self, body: dict) -> None:
        chat = self.path == "/v1/chat/completions"
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt[0] == BAD_TOKEN:
            self._json(400, {"error": {"message": "prompt too long", "type": "invalid"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["max_completion_tokens"] if chat else body["max_tokens"]
        for i in range(n):
            time.sleep(DELAY_S)
            piece = f"t{i} "
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"text": piece}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
            if isinstance(prompt, list) and prompt[0] == CUT_TOKEN and i == 1:
                return  # connection closes without [DONE]
        if body.get("stream_options", {}).get("include_usage") and not self.state.get("no_usage"):
            p = len(prompt) if isinstance(prompt, list) else 3
            usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture()
def fake_server():
    _FakeOpenAI.state = {"lock": threading.Lock(), "payloads": [], "in_flight": 0}
    _FakeOpenAI.state["max_in_flight"] = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeOpenAI.state
    server.shutdown()
    server.server_close()


def test_sse_decoder():
    d = SSEDecoder()
    lines = ['data: {"a": 1}', "", ": keep-alive comment", "", "event: x", "data:[DONE]", ""]
    assert [x for x in map(d.feed, lines) if x is not None] == ['{"a": 1}', "[DONE]"]
    assert d.flush() is None
    for line in ["data: first", "data:second", "id: 7"]:  # multi-line data, no blank line at EOF
        assert d.feed(line) is None
    assert d.flush() == "first\nsecond" and d.flush() is None


def test_completions_timing_usage_and_payload(fake_server, tmp_path):
    url, state = fake_server
    out = tmp_path / "r.json"
    config = BenchConfig(
        url=url,
        num_prompts=4,
        input_len=5,
        output_len=4,
        vocab_size=50,
        result_json=str(out),
        progress=False,
        label="fake",
    )
    result = run_benchmark(config)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["model_id"] == "fake-model" and result["label"] == "fake"
    assert result["output_lens"] == [4] * 4 and result["input_lens"] == [5] * 4
    assert result["generated_texts"] == ["t0 t1 t2 t3 "] * 4
    for p in state["payloads"]:  # what went over the wire
        assert p["model"] == "fake-model" and p["max_tokens"] == 4 and p["stream"] is True
        assert p["stream_options"] == {"include_usage": True} and p["ignore_eos"] is True
        assert len(p["prompt"]) == 5 and all(0 <= t < 50 for t in p["prompt"])
    # the server waits DELAY_S before every chunk: lower bounds hold whatever the machine load
    for ttft, itls, e2e in zip(result["ttfts"], result["itls"], result["e2els"]):
        assert ttft >= DELAY_S * 0.9 and len(itls) == 3
        assert all(g >= DELAY_S * 0.5 for g in itls) and e2e >= ttft + sum(itls) - 1e-9
    assert result["mean_tpot_ms"] >= DELAY_S * 1000 * 0.5
    assert result["total_output_tokens"] == 16 and result["total_input_tokens"] == 20
    assert result["request_throughput"] == pytest.approx(4 / result["duration"])


def test_chat_endpoint_and_counted_chunks_without_usage(fake_server):
    url, state = fake_server
    state["no_usage"] = True  # a server that ignores stream_options
    result = run_benchmark(
        BenchConfig(
            url=url,
            endpoint="/v1/chat/completions",
            num_prompts=2,
            input_len=3,
            output_len=3,
            progress=False,
            model="m",
        )
    )
    assert result["completed"] == 2 and result["output_lens"] == [3, 3]  # counted chunks
    assert result["input_lens"] == [None, None]  # text prompts, no usage: unknown
    p = state["payloads"][0]
    assert p["messages"][0]["role"] == "user" and isinstance(p["messages"][0]["content"], str)
    assert p["max_completion_tokens"] == 3 and p["model"] == "m"


def test_failures_are_recorded_not_raised(fake_server, tmp_path):
    url, _ = fake_server
    f = tmp_path / "d.jsonl"
    lines = [
        {"prompt": [5, 6], "output_len": 3},
        {"prompt": [BAD_TOKEN, 6], "output_len": 3},
        {"prompt": [CUT_TOKEN, 6], "output_len": 5},
    ]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = run_benchmark(BenchConfig(url=url, dataset=str(f), num_prompts=3, progress=False))
    assert result["completed"] == 1 and result["failed"] == 2
    assert result["errors"][0] == ""
    assert result["errors"][1] == "HTTP 400: prompt too long"
    assert "[DONE]" in result["errors"][2]
    assert result["total_output_tokens"] == 3  # failed requests do not count
    assert result["ignore_eos"] is False  # datasets keep eos by default


def test_request_rate_and_max_concurrency(fake_server):
    url, state = fake_server
    start = time.perf_counter()
    result = run_benchmark(
        BenchConfig(
            url=url, num_prompts=6, input_len=2, output_len=3, max_concurrency=2, progress=False
        )
    )
    assert result["completed"] == 6 and state["max_in_flight"] == 2
    # 3 waves of 2 requests, each >= 3 * DELAY_S
    assert time.perf_counter() - start >= 3 * 3 * DELAY_S
    state["max_in_flight"] = 0
    rate = 20.0
    result = run_benchmark(
        BenchConfig(
            url=url,
            num_prompts=5,
            input_len=2,
            output_len=1,
            request_rate=rate,
            burstiness=1e6,
            progress=False,
        )  # huge shape: gaps of ~1/rate exactly
    )
    assert result["completed"] == 5 and result["duration"] >= 4 / rate * 0.95


def test_api_key_and_unreachable_server(fake_server, monkeypatch):
    url, state = fake_server
    state["api_key"] = "sekret"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(FastServeError, match="HTTP 401: bad key"):
        discover_model(url, None)
    assert discover_model(url, "sekret") == "fake-model"
    monkeypatch.setenv("OPENAI_API_KEY", "sekret")
    assert discover_model(url, None) == "fake-model"
    result = run_benchmark(
        BenchConfig(url=url, num_prompts=1, input_len=2, output_len=2, progress=False)
    )
    assert result["completed"] == 1
    with pytest.raises(FastServeError, match="cannot reach"):
        discover_model("http://127.0.0.1:9", None)
