"""`fastserve chat MODEL_DIR|URL`: a terminal chat that streams the reply as it is generated.

    fastserve chat runs/demo/train/model --system "Answer in one line." --temperature 0
    fastserve chat http://127.0.0.1:8000 --api-key KEY        # any OpenAI-compatible server

    run_chat("runs/demo/train/model", ChatOptions(temperature=0.0))   # the same, from Python

A model dir runs in-process on an `AsyncEngine`, the conversation rendered with the tokenizer's
chat template (`add_generation_prompt=True`); a URL is talked to through its streaming
/v1/chat/completions. The history (system, user and assistant turns) is kept and sent whole each
turn. Commands: `/reset` clears the history, `/exit` quits; EOF (Ctrl-D) and Ctrl-C quit too.

Input comes through `input()`, so a script can drive a chat through stdin; stdout carries only
the prompt `> ` and the replies, each ended by a newline; notices and errors go to stderr.
What this module does not know: HTTP servers' internals, scheduling, or how templates are rendered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from fastserve.errors import ConfigError, FastServeError

PROMPT = "> "
COMMANDS = "/reset clears the history, /exit quits"


@dataclass
class ChatOptions:
    # System message at the start of every conversation (kept across /reset).
    system: str | None = None
    # Tokens per reply at most.
    max_tokens: int = 256
    # Sampling temperature; 0 = greedy.
    temperature: float = 0.8
    # Nucleus sampling: the smallest set of tokens with probability mass >= top_p.
    top_p: float = 1.0
    # Sampling seed of every reply (reproducible replies); None -> unseeded.
    seed: int | None = None
    # Server only: model name; None -> the first id listed by /v1/models.
    model: str | None = None
    # Server only: bearer token; None -> $OPENAI_API_KEY when set.
    api_key: str | None = None
    # Model dir only: torch device and KV cache budget of the in-process engine.
    device: str = "cpu"
    kv_cache_memory: str = "256MiB"

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


class TurnError(Exception):
    """A reply that could not be produced (the chat goes on without that turn)."""


class EngineChat:
    """Replies from an in-process AsyncEngine; each reply is one request on a private loop."""

    def __init__(self, model_dir: str, options: ChatOptions) -> None:
        from fastserve.engine import AsyncEngine, SamplingParams

        self.engine = AsyncEngine.from_model_dir(
            model_dir, device=options.device, kv_cache_memory=options.kv_cache_memory
        )
        self.tokenizer = self.engine.engine.tokenizer
        self.params = SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
        )
        self.loop = asyncio.new_event_loop()
        self._ids = itertools.count()

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        request_id = f"chat-{next(self._ids)}"
        outputs = self.engine.generate(prompt, self.params, request_id)
        text, finished = "", False
        try:
            while not finished:
                try:
                    out = self.loop.run_until_complete(outputs.__anext__())
                except StopAsyncIteration:
                    break
                except ValueError as exc:  # e.g. the conversation no longer fits the context
                    raise TurnError(str(exc)) from None
                finished = out.finished
                new = out.outputs[0].text
                if new.startswith(text):  # cumulative text: print what is new
                    yield new[len(text) :]
                text = new
        finally:
            if finished:
                self.loop.run_until_complete(outputs.aclose())
            else:  # Ctrl-C, an error or an abandoned reply: free the request's KV at once
                self.engine.abort(request_id)

    def close(self) -> None:
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()
        self.engine.shutdown()


class ServerChat:
    """Replies streamed from an OpenAI-compatible server's /v1/chat/completions."""

    def __init__(self, url: str, options: ChatOptions) -> None:
        import httpx

        from fastserve.eval.openai_client import auth_headers, discover_model

        self.url = url.rstrip("/")
        self.options = options
        self.headers = auth_headers(options.api_key)
        self.model = options.model or discover_model(self.url, options.api_key)
        self.client = httpx.Client(timeout=httpx.Timeout(600.0, connect=30.0), trust_env=False)

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        import httpx

        from fastserve.eval.openai_client import (
            CHAT_ENDPOINT,
            SSEDecoder,
            chunk_text,
            error_message,
        )

        o = self.options
        payload = {
            "model": self.model,
            "messages": messages,
            "max_completion_tokens": o.max_tokens,
            "temperature": float(o.temperature),
            "top_p": float(o.top_p),
            "stream": True,
        }
        if o.seed is not None:
            payload["seed"] = o.seed
        url = self.url + CHAT_ENDPOINT
        try:
            with self.client.stream("POST", url, json=payload, headers=self.headers) as resp:
                if resp.status_code != 200:
                    raise TurnError(error_message(resp.status_code, resp.read()))
                decoder = SSEDecoder()
                for line in resp.iter_lines():
                    data = decoder.feed(line)
                    if data is None:
                        continue
                    if data.strip() == "[DONE]":
                        return
                    obj = json.loads(data)
                    if isinstance(obj, dict) and obj.get("error"):
                        raise TurnError(error_message(200, data.encode()))
                    piece = chunk_text(obj, chat=True)
                    if piece:
                        yield piece
                if (decoder.flush() or "").strip() != "[DONE]":
                    raise TurnError("the stream ended before data: [DONE]")
        except (httpx.HTTPError, json.JSONDecodeError, AttributeError) as exc:
            raise TurnError(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self.client.close()


def open_backend(target: str, options: ChatOptions) -> EngineChat | ServerChat:
    if target.startswith(("http://", "https://")):
        return ServerChat(target, options)
    from pathlib import Path

    if not Path(target).is_dir():
        raise FastServeError(f"{target!r} is neither a model directory nor an http(s):// URL.")
    return EngineChat(target, options)


def run_chat(
    target: str,
    options: ChatOptions | None = None,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    """The chat loop until /exit, EOF or Ctrl-C; returns the exit status (0)."""
    from rich.markup import escape

    from fastserve.utils.console import err_console

    options = options or ChatOptions()
    options.validate()
    out = out or sys.stdout
    backend = open_backend(target, options)
    start = [{"role": "system", "content": options.system}] if options.system else []
    messages = list(start)
    err_console.print(f"[dim]chatting with {escape(target)}: {COMMANDS}[/dim]")
    try:
        while True:
            try:
                line = read(PROMPT)
            except EOFError:
                out.write("\n")
                break
            command = line.strip()
            if not command:
                continue
            if command == "/exit":
                break
            if command == "/reset":
                messages = list(start)
                err_console.print("[dim]history cleared[/dim]")
                continue
            messages.append({"role": "user", "content": line})
            pieces: list[str] = []
            try:
                for piece in backend.stream(messages):
                    out.write(piece)
                    out.flush()
                    pieces.append(piece)
            except TurnError as exc:
                messages.pop()  # the turn did not happen
                out.write("\n" if pieces else "")
                err_console.print("[bold red]error:[/bold red]", escape(str(exc)))
                continue
            out.write("\n")
            out.flush()
            messages.append({"role": "assistant", "content": "".join(pieces)})
    except KeyboardInterrupt:
        out.write("\n")
    finally:
        out.flush()
        backend.close()
    return 0
