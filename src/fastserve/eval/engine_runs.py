"""Driving an LLMEngine with a list of requests: add them as room frees up, step, hand back each
finished output; what is still in the engine when the caller stops (an error, an interrupt) is
aborted. Used by the task scorer (loglikelihood.py) and the generator (generative.py).

    for key, out in finished_outputs(engine, ((key, token_ids, params), ...), max_in_flight):
        ...
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastserve.errors import FastServeError

__all__ = ["finished_outputs"]

_ids = itertools.count()


def finished_outputs(
    engine,
    requests: Iterable[tuple[Any, list[int], Any]],
    max_in_flight: int,
    add_error: Callable[[Any, ValueError], FastServeError],
    prefix: str = "req",
) -> Iterator[tuple[Any, Any]]:
    """(key, RequestOutput) of every (key, token_ids, SamplingParams) once it finishes, at most
    `max_in_flight` requests in the engine at a time; `add_error(key, exc)` is the error raised
    when the engine refuses a request."""
    pending = iter(requests)
    owner: dict[str, Any] = {}
    more = True
    try:
        while more or owner:
            while more and len(owner) < max_in_flight:
                item = next(pending, None)
                if item is None:
                    more = False
                    break
                key, token_ids, params = item
                rid = f"{prefix}-{next(_ids)}"
                try:
                    engine.add_request(rid, list(token_ids), params)
                except ValueError as exc:
                    raise add_error(key, exc) from None
                owner[rid] = key
            for out in engine.step():
                if out.finished and out.request_id in owner:
                    yield owner.pop(out.request_id), out
    finally:
        for rid in owner:
            engine.abort_request(rid, count=False)
