"""AsyncEngine admission: several requests at once, all or none, against an exact bound on the
waiting sequences (each of n counts), and nothing left behind by a caller that leaves early."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from fastserve.engine import EngineConfig, LLMEngine, SamplingParams
from fastserve.engine.async_engine import AsyncEngine, QueueFullError
from fastserve.model import load_model

LONG = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engine(tiny_model_dir):
    from fastserve.data.tokenizer import Tokenizer

    config = EngineConfig(max_num_seqs=1, num_kv_blocks=64, block_size=4, policy="fcfs")
    llm = LLMEngine(load_model(tiny_model_dir), Tokenizer.load(tiny_model_dir), config)
    execute = llm.runner.execute

    def slow(batch):  # 20 ms a step: the long request holds its slot for ~2 s
        time.sleep(0.02)
        return execute(batch)

    llm.runner.execute = slow
    async_engine = AsyncEngine(llm)
    yield async_engine
    async_engine.shutdown()


async def drain(stream) -> list:
    return [out async for _, out in stream]


async def occupy(engine: AsyncEngine) -> asyncio.Task:
    """A long request that holds the only running slot, so later ones wait."""
    stream = engine.generate_many([[1, 2, 3]], [LONG], ["long"])
    first = await anext(stream)
    assert first[1].outputs[0].token_ids  # running
    return asyncio.create_task(drain(stream))


def test_the_waiting_bound_counts_every_sequence_exactly(engine):
    async def main():
        busy = await occupy(engine)
        admitted, refused = [], []

        async def one(i: int, n: int):
            params = SamplingParams(n=n, max_tokens=2, temperature=0.0, ignore_eos=True)
            try:
                outs = await drain(engine.generate_many([[5, 6]], [params], [f"r{i}"], 0, 5))
                admitted.append((i, n, outs[-1]))
            except QueueFullError:
                refused.append((i, n))

        # 4 sequences first (n=4), then 12 concurrent single ones: exactly one more fits
        first = asyncio.create_task(one(0, 4))
        await asyncio.sleep(0.3)
        await asyncio.gather(*(one(i, 1) for i in range(1, 13)))
        await first
        await busy
        return admitted, refused

    admitted, refused = asyncio.run(main())
    assert sorted(n for _, n, _ in admitted) == [1, 4] and len(refused) == 11
    assert all(o.finish_reason == "length" for _, _, out in admitted for o in out.outputs)


def test_a_list_of_prompts_is_admitted_all_or_none(engine):
    async def main():
        busy = await occupy(engine)
        with pytest.raises(QueueFullError):  # 3 prompts > 2
            await drain(engine.generate_many([[5], [6], [7]], [SHORT] * 3, ["a", "b", "c"], 0, 2))
        assert engine.stats().num_waiting == 0
        with pytest.raises(ValueError, match="prompt token ids"):  # the second one is invalid
            await drain(engine.generate_many([[5], [10**6]], [SHORT] * 2, ["d", "e"]))
        stats = engine.stats()
        assert stats.num_waiting == 0 and "abort" not in stats.finished_by_reason
        outs = await drain(engine.generate_many([[5], [6]], [SHORT] * 2, ["f", "g"], 0, 2))
        await busy
        return outs

    outs = asyncio.run(main())
    assert sorted(o.request_id for o in outs if o.finished) == ["f", "g"]


def test_leaving_during_the_admission_leaves_nothing_behind(engine):
    async def main():
        for i in range(20):
            stream = engine.generate_many([[5, 6, 7]], [LONG], [f"x{i}"])
            task = asyncio.create_task(anext(stream))
            await asyncio.sleep(0.001 * (i % 5))  # cancel at different points of the admission
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await task
            await stream.aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while engine.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.num_free_blocks() == engine.engine.kv.num_blocks
