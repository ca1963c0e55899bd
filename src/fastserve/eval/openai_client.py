"""A minimal streaming client of the OpenAI API (httpx): SSE decoding, errors, timing.

    model = discover_model("http://127.0.0.1:8000", api_key=None)   # first id of /v1/models
    async with httpx.AsyncClient() as client:
        result = await send_request(client, url, "/v1/completions", payload, headers, 8)
        result.ttft_s, result.itl_s, result.output_len, result.error

`send_request` never raises for a failed request: a non-200 status (the OpenAI error message is
kept), an error chunk, a dropped connection or a stream without `data: [DONE]` give
`RequestResult(ok=False, error=...)`. Used by the serving benchmark and by `fastserve chat`.
What this module does not know: workloads, statistics, or anything about the server beyond the
OpenAI API.
"""

from __future__ import annotations

import json
import os
import time

from fastserve.errors import FastServeError
from fastserve.eval.loadgen_stats import RequestResult

CHAT_ENDPOINT = "/v1/chat/completions"


class SSEDecoder:
    """Server-sent events by line: `feed` returns an event's data when a blank line ends it."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # comments (":"), event:, id:, retry: carry nothing we use

    def flush(self) -> str | None:
        """The data of a last event the stream ended without a blank line after."""
        return self.feed("")


def auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def error_message(status: int, body: bytes) -> str:
    """`HTTP 400: <message>` from an OpenAI error body, or the raw body when it is not one."""
    try:
        obj = json.loads(body)
        message = obj["error"]["message"] if isinstance(obj.get("error"), dict) else obj["error"]
    except (ValueError, KeyError, TypeError, AttributeError):
        message = body.decode("utf-8", "replace").strip()[:500]
    return f"HTTP {status}: {message}"


def chunk_text(obj: dict, chat: bool) -> str:
    """The text a streamed chunk carries (completions: choices[0].text; chat: delta.content)."""
    choices = obj.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def fetch_models(url: str, api_key: str | None, timeout_s: float = 30.0) -> list[dict]:
    """The model cards GET /v1/models lists (each has an "id"; vLLM and FastServe add "root"
    and "max_model_len"); FastServeError when the server cannot be reached or lists none."""
    import httpx

    try:
        resp = httpx.get(
            url.rstrip("/") + "/v1/models",
            headers=auth_headers(api_key),
            timeout=timeout_s,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        raise FastServeError(f"cannot reach {url}: {exc}") from None
    if resp.status_code != 200:
        raise FastServeError(
            f"GET {url}/v1/models: {error_message(resp.status_code, resp.content)}"
        )
    try:
        cards = resp.json()["data"]
        if cards and all(isinstance(c, dict) and "id" in c for c in cards):
            return cards
    except (ValueError, KeyError, TypeError):
        pass
    raise FastServeError(f"GET {url}/v1/models listed no model; pass --model")


def discover_model(url: str, api_key: str | None, timeout_s: float = 30.0) -> str:
    """The first model id that GET /v1/models lists; FastServeError when there is none."""
    return str(fetch_models(url, api_key, timeout_s)[0]["id"])


async def send_request(
    client, url: str, endpoint: str, payload: dict, headers: dict, prompt_len: int | None
) -> RequestResult:
    """POST one streaming request and time it; failures are returned, never raised."""
    import httpx

    chat = endpoint == CHAT_ENDPOINT
    result = RequestResult(ok=False, prompt_len=prompt_len)
    text_parts: list[str] = []
    usage: dict = {}
    done = False
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + endpoint, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = error_message(resp.status_code, await resp.aread())
            else:
                decoder = SSEDecoder()
                async for line in resp.aiter_lines():
                    data = decoder.feed(line)
                    if data is None:
                        continue
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    obj = json.loads(data)
                    if isinstance(obj, dict) and obj.get("error"):
                        result.error = error_message(200, data.encode())
                        break
                    usage = obj.get("usage") or usage
                    piece = chunk_text(obj, chat)
                    if piece:
                        now = time.perf_counter()
                        if result.ttft_s is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        text_parts.append(piece)
                if not done and not result.error and (decoder.flush() or "").strip() == "[DONE]":
                    done = True
                if not done and not result.error:
                    result.error = "the stream ended before data: [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError, AttributeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e_s = time.perf_counter() - start
    result.generated_text = "".join(text_parts)
    result.ok = done and not result.error
    result.output_len = int(usage.get("completion_tokens", len(text_parts)))
    if usage.get("prompt_tokens") is not None:
        result.prompt_len = int(usage["prompt_tokens"])
    return result
