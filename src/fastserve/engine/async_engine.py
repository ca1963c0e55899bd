"""`AsyncEngine`: the engine's step loop on a background thread, streamed to asyncio callers.

    engine = AsyncEngine.from_model_dir("runs/small/model", policy="mlfq")
    async for out in engine.generate("def main(", SamplingParams(max_tokens=64), "req-1"):
        print(out.outputs[0].text)            # cumulative text so far; out.finished at the end

One thread owns `LLMEngine.step()`; callers on any event loop add and abort requests under a lock
(held for one step at most). Each request has an asyncio.Queue on its caller's loop, fed with
`call_soon_threadsafe`. Leaving the `async for` early (break, exception, task cancellation, a client
disconnect in the server) aborts the request and frees its KV blocks at once.
Knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator

from fastserve.engine.config import EngineConfig
from fastserve.engine.engine import EngineStats, LLMEngine
from fastserve.engine.request import RequestOutput, SamplingParams


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # engine calls: the step thread vs add/abort from callers
        self._work = threading.Event()  # set when a request arrives; the loop sleeps without work
        self._stopping = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="fastserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model_dir(cls, model: str, **engine_options) -> AsyncEngine:
        return cls(LLMEngine.from_model_dir(model, EngineConfig.from_kwargs(**engine_options)))

    # ---- the step thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.engine.has_unfinished_requests()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except BaseException as exc:  # a bug: fail every stream loudly, stop stepping
                        self._error = exc
                        self._fail_all(exc)
                        return
                else:
                    self._work.clear()
            if not busy:
                self._work.wait(timeout=0.5)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._streams):
            self._deliver(request_id, exc)

    # ---- callers ---------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative RequestOutputs of one request until it finishes.

        Raises ValueError (before the first output) for an invalid request, e.g. a prompt longer
        than the context; the engine goes on serving everyone else.
        """
        if self._error is not None:
            raise RuntimeError("the engine loop has stopped after an error") from self._error
        request_id = request_id or f"async-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            with self._lock:
                self.engine.add_request(
                    request_id, prompt, sampling_params or SamplingParams(), priority=priority
                )
            self._work.set()
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine loop failed") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (a no-op for unknown or finished ids)."""
        with self._lock:
            self.engine.abort_request(request_id)

    def stats(self) -> EngineStats:
        """The engine's gauges and counters, read between steps (blocks for one step at most)."""
        with self._lock:
            return self.engine.stats()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        self._work.set()
        self._thread.join(timeout_s)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()
