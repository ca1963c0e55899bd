"""`AsyncEngine`: the engine's step loop on a background thread, streamed to asyncio callers.

    engine = AsyncEngine.from_model_dir("runs/small/model", policy="mlfq")
    async for out in engine.generate("def main(", SamplingParams(max_tokens=64), "req-1"):
        print(out.outputs[0].text)            # cumulative text so far; out.finished at the end

One thread owns `LLMEngine.step()`; callers on any event loop add and abort requests under a lock
(held for one step at most; admission runs in a worker thread so the event loop never waits for a
step). `generate_many` admits several requests atomically (all or none, against a bound on waiting
sequences: the server's 429). Each call has an asyncio.Queue on its caller's loop, fed with
`call_soon_threadsafe`. Leaving the `async for` early (break, exception, task cancellation, a client
disconnect in the server) aborts the requests and frees their KV blocks at once. A step failure
that no request explains (EngineDeadError) fails every stream and ends the step thread:
`is_running` turns False and `error` says why.
Knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import AsyncIterator

from fastserve.engine.config import EngineConfig
from fastserve.engine.engine import EngineStats, LLMEngine
from fastserve.engine.request import RequestOutput, SamplingParams

logger = logging.getLogger("fastserve.engine")


class QueueFullError(Exception):
    """Admitting the request would put more sequences in the waiting queue than allowed."""


class _Admission:
    """One generate_many call's admission; `cancelled` is read and written under the lock."""

    cancelled = False


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
                    except BaseException as exc:  # no request explains it: fail every stream
                        logger.critical("the engine stopped: %r", exc, exc_info=exc)
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
        request_id = request_id or f"async-{next(self._ids)}"
        stream = self.generate_many([prompt], [sampling_params or SamplingParams()], [request_id])
        async with contextlib.aclosing(stream) as outputs:
            async for _, out in outputs:
                yield out

    async def generate_many(
        self,
        prompts: list[str | list[int]],
        params: list[SamplingParams],
        request_ids: list[str],
        priority: int = 0,
        max_waiting: int | None = None,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Admit several requests at once, all or none, then stream (index, output) as their
        outputs come until every one has finished.

        The admission runs off the event loop on the first iteration, under the engine lock: with
        `max_waiting`, QueueFullError when the waiting sequences plus these (each counts n) would
        exceed it; ValueError for an invalid request (nothing is admitted then). Leaving the
        iteration early (break, exception, cancellation) aborts the unfinished ones and frees
        their KV blocks, whenever it happens, even during the admission.
        """
        if self._error is not None:
            raise RuntimeError("the engine loop has stopped after an error") from self._error
        if len(set(request_ids)) != len(request_ids) or len(request_ids) != len(prompts):
            raise ValueError("request_ids must be unique, one per prompt")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        index = {rid: i for i, rid in enumerate(request_ids)}
        for rid in request_ids:
            self._streams[rid] = (loop, queue)
        pending = set(request_ids)
        admission = _Admission()
        try:
            args = (admission, prompts, params, request_ids, priority, max_waiting)
            await asyncio.to_thread(self._admit, *args)
            self._work.set()
            while pending:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine loop failed") from item
                if item.finished:
                    pending.discard(item.request_id)
                yield index[item.request_id], item
        finally:
            for rid in request_ids:
                self._streams.pop(rid, None)
            if pending:
                with self._lock:
                    admission.cancelled = True
                    for rid in pending:
                        self.engine.abort_request(rid)

    def _admit(self, admission, prompts, params, request_ids, priority, max_waiting) -> None:
        with self._lock:
            if admission.cancelled:
                return
            if self._error is not None:
                raise RuntimeError("the engine loop has stopped after an error")
            if max_waiting is not None:
                waiting = self.engine.scheduler.num_waiting
                num_new = sum(p.n for p in params)
                if waiting + num_new > max_waiting:
                    raise QueueFullError(
                        f"Too many requests waiting ({waiting} sequences waiting + {num_new} "
                        f"in this request > max_queued_requests={max_waiting}); retry later."
                    )
            added = []
            try:
                for prompt, sp, rid in zip(prompts, params, request_ids):
                    self.engine.add_request(rid, prompt, sp, priority=priority)
                    added.append(rid)
            except BaseException:
                for rid in added:  # all or none: take back what was admitted
                    self.engine.abort_request(rid, count=False)
                raise

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

    def wait_stopped(self, timeout_s: float | None = None) -> bool:
        """Block until the step thread ends (shutdown or a dead engine); True if it has."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """What stopped the engine, when a step failed that no request explains."""
        return self._error
