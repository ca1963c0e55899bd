"""The server's own bounds on a request, before anything reaches the engine: body size, JSON
nesting, prompts per request, sequences waiting, tokens per request. (The bounds of each sampling
field live in engine/request.py, next to SamplingParams, and apply to the offline API too.)

    limits = ServerLimits(max_body_bytes=16 * 2**20, max_queued_requests=1024)
    raw = await read_body(request, limits.max_body_bytes)     # BodyTooLarge past the limit
    body = parse_json(raw, limits.max_json_depth)             # ValueError naming the problem

docs/server.md lists every bound and the error it gives.

What this module does not know: routes, schemas, the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from starlette.requests import ClientDisconnect, Request

MAX_PROMPTS = 1024  # prompts in one completions request (a list of strings or of token lists)
MAX_LOGIT_BIAS = 300  # logit_bias entries (OpenAI's bound)


@dataclass(frozen=True)
class ServerLimits:
    # 429 when admitting a request would put more than this many sequences in the engine's
    # waiting queue (each prompt counts n); a request larger than this on its own is a 400.
    max_queued_requests: int = 1024
    # 400 when the sum over a request's sequences of (prompt tokens + max_tokens) exceeds this;
    # None: no bound beyond the context length and max_queued_requests.
    max_request_tokens: int | None = None
    # 413 for a larger request body (Content-Length or the bytes actually sent).
    max_body_bytes: int = 16 * 2**20
    # 400 for JSON nested deeper than this (arrays and objects).
    max_json_depth: int = 32

    def __post_init__(self) -> None:
        for name in ("max_queued_requests", "max_body_bytes", "max_json_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_request_tokens is not None and self.max_request_tokens < 1:
            raise ValueError(f"max_request_tokens must be >= 1, got {self.max_request_tokens}")


class BodyTooLarge(Exception):
    """The request body is over max_body_bytes (-> 413)."""


class ClientGone(Exception):
    """The client disconnected while its body was being read (-> 499, logged at info)."""


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it is known to be too large (before reading it when the
    client sends Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"The request body has {declared} bytes, more than {max_bytes}.")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLarge(f"The request body is larger than {max_bytes} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:  # gone before it sent the whole body: nothing to answer
        raise ClientGone from None
    return b"".join(chunks)


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in `raw` (0 for a scalar). No recursion, so a hostile
    body cannot exhaust the stack as Python's json would, and a few vectorised passes over the
    bytes, so a 16 MiB body costs the event loop milliseconds: brackets count only outside
    strings, and a quote is escaped when an odd run of backslashes ends just before it."""
    b = np.frombuffer(raw, np.uint8)
    quotes = np.flatnonzero(b == ord('"'))
    slashes = np.flatnonzero(b == ord("\\"))
    if slashes.size and quotes.size:
        # run_start[k]: where the run of consecutive backslashes holding slashes[k] starts
        breaks = np.flatnonzero(np.diff(slashes) != 1) + 1
        starts = np.zeros(slashes.size, np.int64)
        starts[breaks] = breaks
        run_start = slashes[np.maximum.accumulate(starts)]
        k = np.searchsorted(slashes, quotes) - 1
        ends_before = (k >= 0) & (slashes[np.maximum(k, 0)] == quotes - 1)
        run = np.where(ends_before, quotes - run_start[np.maximum(k, 0)], 0)
        quotes = quotes[run % 2 == 0]
    brackets = np.flatnonzero((b == ord("[")) | (b == ord("{")) | (b == ord("]")) | (b == ord("}")))
    # a bracket is inside a string when an odd number of real quotes precede it
    brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]
    if brackets.size == 0:
        return 0
    opening = (b[brackets] == ord("[")) | (b[brackets] == ord("{"))
    return max(int(np.cumsum(np.where(opening, 1, -1)).max()), 0)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes, max_depth: int):
    """The body as JSON; ValueError with a readable reason for anything that is not plain JSON
    within the bounds (too deep, NaN/Infinity, integers of more than 4300 digits, bad UTF-8)."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep, more than {max_depth}")
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Invalid JSON body: {exc}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, int digit limit
        raise ValueError(f"Invalid JSON body: {str(exc)[:200]}") from None
