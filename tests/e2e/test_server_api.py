"""`fastserve serve` as a client sees it: one real server process on 127.0.0.1 for the module.

The official `openai` client and raw HTTP against the offline engine (`fastserve.LLM`, greedy) and
an offline float64 log-softmax of the model: completions, chat, streaming, n > 1, stop strings,
logprobs, echo scoring, 32 concurrent streams with /metrics counters, client disconnects (KV freed)
and a matrix of bad requests (4xx OpenAI error JSON, the server keeps serving).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket

import httpx
import pytest
from server_helpers import CONTEXT_LEN, ServerProcess, make_model_dir, wait_for

from fastserve import LLM, SamplingParams

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

openai = pytest.importorskip("openai")
NAME = "tiny-srv"
GEN = "fastserve:generation_tokens_total"


@pytest.fixture(scope="module")
def srv_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("server-api") / "model")


@pytest.fixture(scope="module")
def server(srv_model_dir):
    proc = ServerProcess(srv_model_dir, "--served-model-name", NAME, "--policy", "mlfq")
    try:
        yield proc.wait_ready()
    finally:
        code = proc.stop()
        assert code == 0, proc.log()


@pytest.fixture(scope="module")
def offline(srv_model_dir):
    return LLM(str(srv_model_dir), policy="fcfs")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def greedy(offline, prompts, **kw):
    params = SamplingParams(temperature=0, **kw)
    return offline.generate(prompts, params, use_tqdm=False)


def post(server, path, body, **kw):
    return httpx.post(server.base_url + path, json=body, timeout=60, **kw)


# ---- completions -----------------------------------------------------------------------------


def test_completions_greedy_match_offline(client, offline):
    prompts = ["the cat sat on", "queue blocks", [5, 6, 7, 8], [40, 41]]
    refs = greedy(offline, prompts, max_tokens=12)
    for prompt, ref in zip(prompts, refs):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == ref.outputs[0].text
        assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert r.model == NAME and r.object == "text_completion"
    # a batch of prompts: choices in prompt order, index = prompt position
    r = client.completions.create(
        model=NAME, prompt=[[5, 6, 7, 8], [40, 41]], max_tokens=12, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [refs[2].outputs[0].text, refs[3].outputs[0].text]
    assert r.usage.prompt_tokens == 4 + 2


def test_completions_stream_n_and_seed_match_offline(client, offline):
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    ref = offline.generate("the cat", params, use_tqdm=False)[0]
    stream = client.completions.create(
        model=NAME,
        prompt="the cat",
        max_tokens=10,
        n=3,
        seed=7,
        stream=True,
        extra_body={"ignore_eos": True},
        stream_options={"include_usage": True},
    )
    texts, finish, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert texts == {o.index: o.text for o in ref.outputs}
    assert len(set(texts.values())) > 1  # n different samples
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert usage.completion_tokens == 30 and usage.prompt_tokens == len(ref.prompt_token_ids)


def test_completions_stop_string(client, offline):
    full = greedy(offline, "the cat sat on", max_tokens=16, ignore_eos=True)[0].outputs[0].text
    stop = full[5:8]
    assert stop.strip() and stop in full
    ref = greedy(offline, "the cat sat on", max_tokens=16, ignore_eos=True, stop=[stop])[0]
    r = client.completions.create(
        model=NAME,
        prompt="the cat sat on",
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == ref.outputs[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_completions_logprobs_match_offline(client, offline):
    ref = greedy(offline, [7, 8, 9], max_tokens=6, logprobs=3)[0].outputs[0]
    r = client.completions.create(
        model=NAME, prompt=[7, 8, 9], max_tokens=6, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ref.token_ids)
    for i, tid in enumerate(ref.token_ids):
        assert lp.token_logprobs[i] == pytest.approx(ref.logprobs[i][tid].logprob, abs=1e-5)
        assert len(lp.top_logprobs[i]) <= 4
        # greedy: the chosen token is the most likely one
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()), abs=1e-6)
    assert "".join(lp.tokens) == r.choices[0].text or len(lp.tokens) == 6


def test_echo_logprobs_match_float64_log_softmax(server, srv_model_dir, offline):
    """The lm-eval path: token-id prompt, echo, logprobs=1, max_tokens=1 (and max_tokens=0)."""
    import torch

    from fastserve.model import load_model

    prompt = [3, 50, 51, 52, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190]
    body = {
        "model": NAME,
        "prompt": prompt,
        "echo": True,
        "logprobs": 1,
        "max_tokens": 1,
        "temperature": 0,
    }
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    gen = greedy(offline, prompt, max_tokens=1)[0].outputs[0].token_ids
    ids = prompt + gen
    model = load_model(srv_model_dir).double()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).double()[0], dim=-1)
    assert len(lp["tokens"]) == len(ids) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for pos in range(1, len(ids)):
        want = ref[pos - 1, ids[pos]].item()
        assert lp["token_logprobs"][pos] == pytest.approx(want, abs=1e-4)
        top = lp["top_logprobs"][pos]
        assert isinstance(top, dict) and 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(ref[pos - 1].max().item(), abs=1e-4)
    tok = offline.tokenizer
    assert choice["text"] == tok.decode(prompt, skip_special_tokens=False) + tok.decode(gen)
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"][1] == len(lp["tokens"][0])

    # max_tokens=0 with echo: the prompt's scoring only
    r0 = post(server, "/v1/completions", {**body, "max_tokens": 0}).json()
    lp0 = r0["choices"][0]["logprobs"]
    assert lp0["token_logprobs"] == lp["token_logprobs"][: len(prompt)]
    assert r0["usage"]["completion_tokens"] == 0
    assert r0["choices"][0]["text"] == tok.decode(prompt, skip_special_tokens=False)


def test_echo_stream_matches_non_stream(server):
    body = {
        "prompt": "the cat sat",
        "echo": True,
        "logprobs": 2,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
    }
    full = post(server, "/v1/completions", body).json()["choices"][0]
    text, tokens, token_lps, offsets = "", [], [], []
    with httpx.stream(
        "POST", server.base_url + "/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                text += c["text"]
                tokens += c["logprobs"]["tokens"]
                token_lps += c["logprobs"]["token_logprobs"]
                offsets += c["logprobs"]["text_offset"]
    assert text == full["text"]
    assert tokens == full["logprobs"]["tokens"]
    assert token_lps[0] is None and token_lps == full["logprobs"]["token_logprobs"]
    assert offsets == full["logprobs"]["text_offset"]


# ---- chat --------------------------------------------------------------------------------------


def test_chat_matches_offline_template_and_streams(client, offline):
    messages = [
        {"role": "system", "content": "you are a cat"},
        {"role": "user", "content": "the mat"},
    ]
    prompt = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ref = greedy(offline, prompt, max_tokens=10, logprobs=2)[0].outputs[0]
    r = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert r.usage.prompt_tokens == len(offline.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == len(ref.token_ids)
    content = choice.logprobs.content
    assert len(content) == len(ref.token_ids)
    for entry, tid, ref_lp in zip(content, ref.token_ids, ref.logprobs):
        assert entry.logprob == pytest.approx(ref_lp[tid].logprob, abs=1e-5)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob

    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


# ---- concurrency and metrics ---------------------------------------------------------------


def test_32_concurrent_streams_and_metrics_add_up(server, offline):
    rng = random.Random(0)
    # < 16 tokens each: no full KV block, so no prefix-cache hit changes the prompt-token count
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(2, 12))] for _ in range(32)]
    max_tokens = [rng.randint(8, 24) for _ in range(32)]
    refs = offline.generate(
        prompts,
        [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens],
        use_tqdm=False,
    )
    before = server.metrics()
    aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)

    async def one(prompt, m):
        stream = await aclient.completions.create(
            model=NAME,
            prompt=prompt,
            max_tokens=m,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
        text, usage, reason = "", None, None
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                reason = c.finish_reason or reason
            usage = chunk.usage or usage
        return text, usage, reason

    async def main():
        return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, max_tokens)))

    results = asyncio.run(main())
    for (text, usage, reason), ref, m in zip(results, refs, max_tokens):
        assert text == ref.outputs[0].text
        assert usage.completion_tokens == m and reason == "length"
    after = wait_for(lambda: (m := server.metrics())["fastserve:num_requests_running"] == 0 and m)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["fastserve:prompt_tokens_total"] == sum(len(p) for p in prompts)
    assert delta["fastserve:generation_tokens_total"] == sum(max_tokens)
    assert delta['fastserve:request_success_total{finished_reason="length"}'] == 32
    assert delta["fastserve:e2e_request_latency_seconds_count"] == 32
    assert delta["fastserve:time_to_first_token_seconds_count"] == 32
    assert delta["fastserve:inter_token_latency_seconds_count"] == sum(max_tokens) - 32
    assert after["fastserve:kv_cache_usage_perc"] == 0.0


# ---- disconnects -----------------------------------------------------------------------------


def _idle_and_free(server):
    m = server.metrics()
    busy = m["fastserve:num_requests_running"] + m["fastserve:num_requests_waiting"]
    return busy == 0 and m["fastserve:kv_cache_usage_perc"] == 0.0 and m


def test_stream_disconnect_aborts_and_frees_kv(server):
    before = server.metrics()
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 2000, "stream": True, "ignore_eos": True}
    seen = 0
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen == 3:
                    break  # leave: closes the connection mid-stream
    after = wait_for(lambda: _idle_and_free(server))
    generated = after[GEN] - before[GEN]
    assert 3 <= generated < 2000  # aborted, not run to the end
    aborts = 'fastserve:request_success_total{finished_reason="abort"}'
    assert after[aborts] - before.get(aborts, 0) == 1


def test_non_stream_disconnect_aborts_and_frees_kv(server):
    before = server.metrics()
    payload = json.dumps({"prompt": [9, 10, 11], "max_tokens": 2000, "ignore_eos": True}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head + payload)
        wait_for(
            lambda: (
                server.metrics()["fastserve:generation_tokens_total"]
                > before["fastserve:generation_tokens_total"]
            )
        )
    after = wait_for(lambda: _idle_and_free(server))
    generated = after[GEN] - before[GEN]
    assert 1 <= generated < 2000
    aborts = 'fastserve:request_success_total{finished_reason="abort"}'
    assert after[aborts] - before.get(aborts, 0) == 1


# ---- bad input ---------------------------------------------------------------------------------

CTX = CONTEXT_LEN
BAD = [
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": 12.5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 100000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [7] * (CTX + 1), "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": "the cat sat " * 800}, 400, "prompt"),
    ("/v1/completions", {"prompt": [7, 8], "max_tokens": CTX}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1000}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", "not a json object", 400, None),
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**6},
        400,
        "max_completion_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "model": "nope"},
        404,
        "model",
    ),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/detokenize", {"tokens": [1, -3]}, 400, "tokens"),
    ("/v1/nothing-here", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(server.base_url + path, content=body, timeout=30)
    else:
        r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    ok = post(server, "/v1/completions", {"prompt": "the", "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


# ---- small endpoints -------------------------------------------------------------------------


def test_models_health_tokenize_detokenize(server, client, offline):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = post(server, "/tokenize", {"prompt": "the cat sat"}).json()
    assert r["tokens"] == offline.tokenizer.encode("the cat sat") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CTX
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json()["prompt"] == "the cat sat"
    msgs = [{"role": "user", "content": "hi"}]
    chat = post(server, "/tokenize", {"messages": msgs}).json()["tokens"]
    templ = offline.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert chat == offline.tokenizer.encode(templ)
    metrics = httpx.get(server.base_url + "/metrics").text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "num_requests_swapped",
        "kv_cache_usage_perc",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "request_queue_time_seconds_bucket",
        "num_preemptions_total",
    ):
        assert f"fastserve:{name}" in metrics, name
