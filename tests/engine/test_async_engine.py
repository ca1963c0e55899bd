"""AsyncEngine: streaming from a background step loop, concurrency, cancellation frees KV."""

from __future__ import annotations

import asyncio

import pytest

from fastserve.engine import LLM, AsyncEngine, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = AsyncEngine.from_model_dir(str(tiny_model_dir), policy="mlfq")
    yield engine
    engine.shutdown()


def test_streams_equal_offline_outputs(engine, tiny_model_dir):
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12] * 20, [40, 41]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def collect(i, prompt):
        seen = []
        async for out in engine.generate(prompt, params, request_id=f"s{i}"):
            seen.append(out)
        return seen

    async def main():
        return await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    offline = LLM(str(tiny_model_dir)).generate(prompts, params, use_tqdm=False)
    for stream, ref in zip(streams, offline):
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        lengths = [len(o.outputs[0].token_ids) for o in stream]
        assert lengths == sorted(lengths)  # cumulative outputs only grow
        assert stream[-1].outputs[0].token_ids == ref.outputs[0].token_ids
        assert stream[-1].outputs[0].text == ref.outputs[0].text
    assert engine.engine.num_free_blocks() == engine.engine.kv.num_blocks


def test_cancel_mid_stream_frees_blocks(engine):
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)

    async def main():
        received = 0
        async for _ in engine.generate([5, 6, 7], params, request_id="cancel-me"):
            received += 1
            if received == 3:
                break  # the client went away
        return received

    assert asyncio.run(main()) == 3
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.num_free_blocks() == engine.engine.kv.num_blocks


def test_bad_request_raises_and_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in engine.generate([5] * 10_000, SamplingParams(max_tokens=2)):
                pass
        outs = [o async for o in engine.generate([5, 6], SamplingParams(max_tokens=2))]
        return outs[-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) <= 2
