"""Request isolation inside the engine: a request whose step fails is finished alone with an
error (its KV freed), the rest of the batch is retried and gets the tokens it would have had, and
only a failure that no request explains stops the engine (EngineDeadError).

Faults are injected by wrapping the runner or the sampler of a real engine on the tiny model: the
wrapper raises whenever a poisoned request is in the batch, whatever else is in it."""

from __future__ import annotations

import asyncio

import pytest
import torch

from fastserve.engine import EngineConfig, LLMEngine, SamplingParams
from fastserve.engine.async_engine import AsyncEngine
from fastserve.engine.engine import EngineDeadError
from fastserve.model import load_model

POISON_TOKEN = 7  # a prompt holding this id makes the model forward fail
POISON_SEED = 666  # a request with this seed makes the sampler fail


def make_engine(path, **options) -> LLMEngine:
    from fastserve.data.tokenizer import Tokenizer

    config = EngineConfig(num_kv_blocks=64, block_size=4, **options)
    return LLMEngine(load_model(path), Tokenizer.load(path), config)


def poison_runner(engine: LLMEngine, phase: str = "prefill") -> None:
    """prefill: the forward fails while a poisoned prompt token is computed; decode: it fails
    once that token is in the KV cache (the request's first token was already sampled)."""
    execute = engine.runner.execute

    def failing(batch):
        for r in batch.requests:
            lo, hi = r.num_computed_tokens, r.num_computed_tokens + r.num_new_tokens
            seen = r.token_ids[lo:hi] if phase == "prefill" else r.token_ids[:lo]
            if POISON_TOKEN in seen:
                raise RuntimeError(f"poisoned token in {r.request_id}")
        return execute(batch)

    engine.runner.execute = failing


def poison_sampler(engine: LLMEngine) -> None:
    sampler = engine.sampler

    class Failing:
        generator = sampler.generator

        def __call__(self, logits, batch):
            if any(p.seed == POISON_SEED for p in batch.params):
                raise IndexError("poisoned sampling parameters")
            return sampler(logits, batch)

    engine.sampler = Failing()


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
HEALTHY = {
    "a": ([10, 11, 12, 13, 14], GREEDY),
    "b": ([20, 21, 22], SEEDED),
    "c": ([30, 31, 32, 33, 34, 35, 36, 37, 38], SamplingParams(n=2, max_tokens=12, seed=9)),
}


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    """Every healthy request's tokens in a run without faults."""
    outs = run(make_engine(tiny_model_dir), HEALTHY)
    return {rid: [o.token_ids for o in out.outputs] for rid, out in outs.items()}


def check_healthy(outs, expected, engine) -> None:
    for rid in HEALTHY:
        assert [o.token_ids for o in outs[rid].outputs] == expected[rid], rid
        assert all(o.finish_reason == "length" for o in outs[rid].outputs)
    assert engine.num_free_blocks() == engine.kv.num_blocks  # every block back, poisoned ones too
    assert not engine.scheduler.requests


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_request_that_breaks_the_model_forward_fails_alone(tiny_model_dir, expected, where):
    engine = make_engine(tiny_model_dir)
    poison_runner(engine, where)
    outs = run(engine, {**HEALTHY, "bad": ([40, POISON_TOKEN, 41], GREEDY)})
    bad = outs["bad"].outputs[0]
    assert bad.finish_reason == "error" and "poisoned token in bad" in str(bad.stop_reason)
    assert len(bad.token_ids) == (0 if where == "prefill" else 1)
    check_healthy(outs, expected, engine)
    assert engine.stats().finished_by_reason["error"] == 1
    # the engine goes on serving
    again = run(engine, {"a2": HEALTHY["a"]})
    assert again["a2"].outputs[0].token_ids == expected["a"][0]


def test_a_request_that_breaks_the_sampler_fails_alone(tiny_model_dir, expected):
    engine = make_engine(tiny_model_dir)
    poison_sampler(engine)
    poisoned = SamplingParams(max_tokens=12, temperature=0.8, seed=POISON_SEED)
    outs = run(engine, {**HEALTHY, "bad": ([50, 51, 52], poisoned)})
    bad = outs["bad"].outputs[0]
    assert bad.finish_reason == "error" and "IndexError" in str(bad.stop_reason)
    # seeded healthy requests drew the same random numbers as without the failed attempt
    check_healthy(outs, expected, engine)


def test_a_failure_while_committing_one_request_fails_it_alone(tiny_model_dir, expected):
    engine = make_engine(tiny_model_dir)
    engine.add_request("bad", [60, 61, 62], GREEDY)
    detok = engine._groups["bad"].detokenizers[0]

    def broken(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    detok.add = broken
    outs = run(engine, HEALTHY)
    bad = outs["bad"].outputs[0]
    assert bad.finish_reason == "error" and "UnicodeDecodeError" in str(bad.stop_reason)
    check_healthy(outs, expected, engine)


def test_a_failure_no_single_request_reproduces_stops_the_engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    execute = engine.runner.execute

    def fails_when_batched(batch):
        if len(batch.requests) > 1:
            raise RuntimeError("batch-level fault")
        return execute(batch)

    engine.runner.execute = fails_when_batched
    for rid, (prompt, params) in HEALTHY.items():
        engine.add_request(rid, prompt, params)
    with pytest.raises(EngineDeadError, match="batch-level fault"):
        while engine.has_unfinished_requests():
            engine.step()


def test_a_broken_model_stops_the_engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("weights gone")

    engine.model.forward = broken
    engine.model.model.forward = broken
    engine.add_request("a", [1, 2, 3], GREEDY)
    engine.add_request("b", [4, 5, 6], GREEDY)
    with pytest.raises(EngineDeadError, match="weights gone"):
        engine.step()


def test_async_engine_streams_one_error_and_keeps_serving(tiny_model_dir, expected):
    engine = make_engine(tiny_model_dir)
    poison_runner(engine)
    async_engine = AsyncEngine(engine)

    async def collect(prompt, params, rid):
        last = None
        async for out in async_engine.generate(prompt, params, rid):
            last = out
        return last

    async def main():
        return await asyncio.gather(
            collect([POISON_TOKEN, 1], GREEDY, "bad"),
            *(collect(p, sp, rid) for rid, (p, sp) in HEALTHY.items()),
        )

    try:
        bad, *healthy = asyncio.run(main())
        assert bad.outputs[0].finish_reason == "error"
        for out, rid in zip(healthy, HEALTHY):
            assert [o.token_ids for o in out.outputs] == expected[rid]
        assert async_engine.is_running and async_engine.error is None
    finally:
        async_engine.shutdown()


def test_async_engine_stops_and_reports_a_dead_engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    async_engine = AsyncEngine(engine)

    def broken(*args, **kwargs):
        raise RuntimeError("weights gone")

    engine.model.forward = broken
    engine.model.model.forward = broken

    async def main(rid):
        async for _ in async_engine.generate([1, 2, 3], GREEDY, rid):
            pass

    try:
        with pytest.raises(RuntimeError, match="the engine loop failed"):
            asyncio.run(main("a"))
        assert async_engine.wait_stopped(timeout_s=10)
        assert not async_engine.is_running
        assert isinstance(async_engine.error, EngineDeadError)
        with pytest.raises(RuntimeError, match="stopped after an error"):  # later ones refused
            asyncio.run(main("b"))
    finally:
        async_engine.shutdown()


def test_rng_states_survive_a_failed_attempt(tiny_model_dir):
    """The retry samples what the first attempt would have: generator states are restored."""
    engine = make_engine(tiny_model_dir)
    g = torch.Generator().manual_seed(5)
    engine.add_request("s", [1, 2, 3], SamplingParams(max_tokens=3, seed=5))
    scheduled = engine.scheduler.schedule().scheduled
    states = engine._rng_states(scheduled)
    child = engine._groups["s"].children[0]
    child.generator.manual_seed(99)  # as if a failed attempt had drawn from it
    engine._restore_rng_states(states)
    assert torch.equal(torch.rand(3, generator=child.generator), torch.rand(3, generator=g))
