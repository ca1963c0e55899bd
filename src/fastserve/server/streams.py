"""Async stream plumbing of the server: merge engine streams, stop when the client leaves.

    async for i, out in merge_streams([engine.generate(a, ...), engine.generate(b, ...)]): ...
    result = await until_disconnected(request, collect())   # ClientDisconnected if it left

Cancelling or closing either one cancels the engine streams underneath, and leaving an
`AsyncEngine.generate` stream early aborts its request, which frees its KV blocks.

What this module does not know: OpenAI schemas, routes, the engine's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

from starlette.requests import Request

from fastserve.engine.request import RequestOutput

DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there


class ClientDisconnected(Exception):
    pass


async def until_disconnected(request: Request, awaitable: Awaitable):
    """Await `awaitable` in a task; cancel it (aborting its engine requests) if the client goes."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def merge_streams(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several engine streams as they arrive. Closing or cancelling
    the merged stream cancels every source stream (the engine aborts those requests)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream) as s:
                async for out in s:
                    queue.put_nowait((i, out, None))
        except Exception as exc:
            queue.put_nowait((i, None, exc))
            return
        queue.put_nowait((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                remaining -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
