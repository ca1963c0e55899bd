"""SamplingParams (vLLM names, defaults, validation), Request state, check_stop, metrics."""

from __future__ import annotations

import pytest
import torch

from fastserve.engine.request import (
    CompletionOutput,
    Logprob,
    Request,
    RequestMetrics,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    check_stop,
)


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.min_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (
        1,
        16,
        0,
        1.0,
        1.0,
        0,
        0.0,
    )
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.seed is None
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(top_k=-1).top_k == 0
    greedy = SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.2)
    assert greedy.is_greedy and (greedy.top_k, greedy.top_p, greedy.min_p) == (0, 1.0, 0.0)
    assert not SamplingParams(temperature=0.1).is_greedy


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": "x"}, "seed"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        # the bounds of what the engine can represent (request.MAX_*)
        ({"n": 129}, "n"),
        ({"n": 10**30}, "n"),
        ({"max_tokens": 2**63}, "max_tokens"),
        ({"min_tokens": 2**64}, "min_tokens"),
        ({"top_k": 10**20}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 2**64 + 1}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": 10**20}, "prompt_logprobs"),
        ({"stop": ["x"] * 65}, "stop"),
        ({"stop": ["x" * 1025]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
        ({"stop_token_ids": 7}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"temperature": 10**400}, "temperature"),  # too large for a float (found by fuzzing)
    ],
)
def test_validation_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        SamplingParams(**kwargs)


def test_temperature_message():
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0, got -1"):
        SamplingParams(temperature=-1)


def test_huge_values_are_not_echoed_whole():
    for kwargs in ({"seed": 10**5000}, {"stop_token_ids": [10**5000]}, {"stop": ["x" * 10**6]}):
        with pytest.raises(ValueError, match=rf"^{next(iter(kwargs))} must be") as err:
            SamplingParams(**kwargs)
        assert len(str(err.value)) < 300


def test_bounds_that_depend_on_the_vocabulary():
    SamplingParams(top_k=300).verify(300)
    SamplingParams(stop_token_ids=[299]).verify(300)
    with pytest.raises(ValueError, match=r"^top_k must be at most the vocabulary size \(300\)"):
        SamplingParams(top_k=301).verify(300)
    with pytest.raises(ValueError, match=r"^stop_token_ids must be token ids in \[0, 300\)"):
        SamplingParams(stop_token_ids=[300]).verify(300)


def test_child_params_and_masked_ids():
    p = SamplingParams(n=3, seed=10, stop_token_ids=[5])
    kids = [p.for_child(i) for i in range(3)]
    assert [k.seed for k in kids] == [10, 11, 12] and all(k.n == 1 for k in kids)
    assert SamplingParams(n=2).for_child(1).seed is None
    assert p.masked_token_ids(1) == [5, 1]
    assert p.masked_token_ids(None) == [5]
    assert SamplingParams(stop_token_ids=[5], ignore_eos=True).masked_token_ids(1) == [5]


def test_request_basics():
    r = Request("r", [4, 5, 6], SamplingParams(seed=3), eos_token_id=1, arrival_time=10.0)
    assert r.status is RequestStatus.WAITING and r.last_run_time == 10.0
    assert r.metrics.arrival_time == 10.0
    assert torch.equal(
        torch.rand(4, generator=r.generator),
        torch.rand(4, generator=torch.Generator().manual_seed(3)),
    )
    assert Request("u", [1], SamplingParams()).generator is None
    r.append_output_token(7, now=11.0)
    r.append_output_token(8, now=11.5)
    assert r.output_token_ids == [7, 8] and r.all_token_ids == [4, 5, 6, 7, 8]
    assert (r.num_prompt_tokens, r.num_output_tokens, r.num_tokens) == (3, 2, 5)
    assert r.metrics.first_token_time == 11.0 and r.metrics.token_times == [11.0, 11.5]
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Request("e", [], SamplingParams())


def test_status_and_finish():
    assert not RequestStatus.SWAPPED.is_finished and RequestStatus.FINISHED_ABORTED.is_finished
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert RequestStatus.RUNNING.finish_reason is None
    r = Request("r", [1], SamplingParams(), arrival_time=0.0)
    r.finish(RequestStatus.FINISHED_ABORTED, now=2.0)
    assert r.is_finished and r.finish_reason == "abort" and r.metrics.finished_time == 2.0
    with pytest.raises(ValueError):
        r.finish(RequestStatus.RUNNING)


def _run_until_stop(params, tokens, eos=1, max_model_len=100, prompt_len=2):
    r = Request("r", list(range(10, 10 + prompt_len)), params, eos_token_id=eos)
    for i, t in enumerate(tokens):
        r.append_output_token(t)
        if check_stop(r, max_model_len):
            return r, i + 1
    return r, None


def test_check_stop():
    r, n = _run_until_stop(SamplingParams(max_tokens=10), [5, 6, 1, 7])
    assert n == 3 and r.finish_reason == "stop" and r.stop_reason is None
    r, n = _run_until_stop(SamplingParams(max_tokens=10, ignore_eos=True), [5, 1, 1, 7])
    assert n is None
    r, n = _run_until_stop(SamplingParams(max_tokens=10, min_tokens=3), [1, 1, 1, 1])
    assert n == 3  # the 3rd token may stop (vLLM: stops once num_output >= min_tokens)
    r, n = _run_until_stop(SamplingParams(max_tokens=10, stop_token_ids=[9]), [5, 9])
    assert n == 2 and r.finish_reason == "stop" and r.stop_reason == 9
    r, n = _run_until_stop(SamplingParams(max_tokens=3), [5, 6, 7, 8])
    assert n == 3 and r.finish_reason == "length" and r.status is RequestStatus.FINISHED_LENGTH
    r, n = _run_until_stop(SamplingParams(max_tokens=3), [5, 6, 1])
    assert n == 3 and r.finish_reason == "stop"  # eos at the last allowed position
    r, n = _run_until_stop(SamplingParams(max_tokens=None), [5] * 20, max_model_len=6)
    assert n == 4 and r.finish_reason == "length" and r.num_tokens == 6


def test_metrics():
    m = RequestMetrics(
        arrival_time=1.0,
        first_scheduled_time=1.5,
        first_token_time=2.0,
        token_times=[2.0, 2.5, 3.5],
        finished_time=3.5,
    )
    assert (m.queue_s, m.ttft_s, m.e2e_s) == (0.5, 1.0, 2.5)
    assert m.tpot_s == pytest.approx(0.75) and m.itl_s == [0.5, 1.0]
    empty = RequestMetrics(arrival_time=0.0)
    assert (empty.ttft_s, empty.e2e_s, empty.tpot_s, empty.queue_s, empty.itl_s) == (
        None,
        None,
        None,
        None,
        [],
    )


def test_output_shapes():
    c = CompletionOutput(0, "hi", [5, 6], -1.5, [{5: Logprob(-1.0, 1, "h")}], "stop", "###")
    assert c.finished() and not CompletionOutput(1, "", [], finish_reason=None).finished()
    out = RequestOutput("r", "p", [1, 2], [None, {2: Logprob(-0.1)}], [c], True)
    assert out.outputs[0].text == "hi" and out.metrics is None
