"""Async stream plumbing of the server: stop when the client leaves.

    result = await until_disconnected(request, collect())   # ClientDisconnected if it left

Cancelling it cancels the engine stream underneath, and leaving an `AsyncEngine.generate_many`
stream early aborts its requests, which frees their KV blocks.

What this module does not know: OpenAI schemas, routes, the engine's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

from starlette.requests import Request

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
