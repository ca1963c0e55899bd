"""Fuzzing: the HTTP API from its own OpenAPI document (schemathesis: cases that follow the schema
and cases that break it) against a real `fastserve serve` process, and SamplingParams with
hypothesis against a real engine.

Properties: no 5xx; every error body is OpenAI's `{"error": {message, type, param, code}}`; after
each batch of cases a valid greedy request still returns the same text as before; a
SamplingParams either raises ValueError naming one of its fields or runs to completion."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections import Counter

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_settings import report, scale
from schemathesis.generation import GenerationMode

from e2e.server_helpers import make_model_dir, running_server
from fastserve.engine import EngineConfig, LLMEngine, SamplingParams
from fastserve.model import load_model

PROBE = {"prompt": "the cat sat", "max_tokens": 8, "temperature": 0}
CASES = scale(25, 300)  # per operation and generation mode


@pytest.fixture(scope="module")
def fuzz_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("fuzz") / "model")


@pytest.fixture(scope="module")
def server(fuzz_model_dir):
    # a short context and queue keep every generated request small
    with running_server(
        fuzz_model_dir,
        "--max-model-len",
        "64",
        "--max-queued-requests",
        "64",
        "--max-body-size",
        "1MiB",
        "--log-level",
        "warning",
    ) as proc:
        yield proc


def probe(server) -> str:
    r = httpx.post(server.base_url + "/v1/completions", json=PROBE, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def check_response(status: int, body: bytes, content_type: str) -> None:
    assert status < 500, body[:2000]
    if status >= 400:
        assert content_type.startswith("application/json"), content_type
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]


def fuzz(server, op, mode: GenerationMode) -> Counter:
    """CASES cases of one operation; returns the count of each status code answered."""
    statuses: Counter = Counter()

    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.generate],
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(base_url=server.base_url, timeout=120)
        statuses[response.status_code] += 1
        content_type = response.headers.get("content-type", "")
        if isinstance(content_type, list):
            content_type = content_type[0] if content_type else ""
        check_response(response.status_code, response.content, content_type)

    # an operation with no input to break (GET /health) has no negative cases
    with contextlib.suppress(hypothesis.errors.Unsatisfiable):
        run()
    return statuses


def test_http_api_schema_fuzzing(server):
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    expected = probe(server)
    counts: dict[str, Counter] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = f"{op.method.upper()} {op.path} {mode.value}"
            counts[key] = fuzz(server, op, mode)
            assert probe(server) == expected, f"greedy output changed after {key}"
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    total = sum(sum(c.values()) for c in counts.values())
    assert total >= CASES * 4, counts
    # the schema-following cases reach the engine, not only the validation
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        assert counts[f"POST {path} positive"][200] > 0, counts
    by_status = sum(counts.values(), Counter())
    report(
        "schema_fuzz",
        cases=total,
        operations=len(operations),
        statuses={str(k): v for k, v in sorted(by_status.items())},
        server_errors=0,
    )


# ---- SamplingParams -------------------------------------------------------------------------

HOSTILE_INTS = st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**5000])
HOSTILE = st.one_of(
    HOSTILE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.text(max_size=5),
    st.lists(st.integers(-5, 400), max_size=3),
)


# values inside each field's bounds
VALID = {
    "n": st.integers(1, 3),
    "max_tokens": st.one_of(st.integers(2, 6), st.none()),
    "min_tokens": st.integers(0, 2),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 300),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.1, 2),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "stop": st.one_of(st.none(), st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1))),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(0, 299), max_size=3)),
    "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "prompt_logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
}
NAMES = [f.name for f in dataclasses.fields(SamplingParams)]


@st.composite
def sampling_kwargs(draw):
    """Valid values for a random subset of the fields; half the time one field gets a hostile
    value or one just outside its bounds instead."""
    kwargs = {name: draw(valid) for name, valid in VALID.items() if draw(st.booleans())}
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(VALID)))
        kwargs[name] = draw(st.one_of(HOSTILE, st.integers(-3, 400), st.floats(-3, 3)))
    return kwargs


@pytest.fixture(scope="module")
def engine(fuzz_model_dir):
    from fastserve.data.tokenizer import Tokenizer

    config = EngineConfig(num_kv_blocks=256, block_size=4, max_model_len=64)
    return LLMEngine(load_model(fuzz_model_dir), Tokenizer.load(fuzz_model_dir), config)


def test_sampling_params_either_name_the_field_or_run(engine):
    outcome = {"rejected": 0, "ran": 0}

    @settings(max_examples=scale(150, 2000), deadline=None, database=None, derandomize=True)
    @given(kwargs=sampling_kwargs())
    def run(kwargs):
        try:
            params = SamplingParams(**kwargs)
            engine.add_request("r", [5, 6, 7], params)
        except ValueError as exc:
            name = str(exc).split(" ", 1)[0]
            assert name in NAMES and name in kwargs, (kwargs, str(exc))
            outcome["rejected"] += 1
            return
        while engine.has_unfinished_requests():
            outs = engine.step()
        (out,) = outs
        assert out.finished and len(out.outputs) == params.n
        for o in out.outputs:
            assert o.finish_reason in ("stop", "length"), (kwargs, o)
            if o.cumulative_logprob is not None:
                assert math.isfinite(o.cumulative_logprob) or o.cumulative_logprob < 0
        outcome["ran"] += 1

    run()
    assert engine.num_free_blocks() == engine.kv.num_blocks
    assert outcome["rejected"] > 10 and outcome["ran"] > 10, outcome  # both sides explored
    report("sampling_params_fuzz", **outcome)
