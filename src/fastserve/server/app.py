"""The OpenAI-compatible HTTP app: FastAPI routes that translate HTTP <-> `AsyncEngine` calls.

    engine = AsyncEngine.from_model_dir("runs/small/model", policy="mlfq")
    app = build_app(engine, served_model_name="small", api_key=None, limits=ServerLimits())
    uvicorn.run(app, port=8000)            # or `fastserve serve runs/small/model`

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with server-sent events:
`data: {json}\\n\\n` chunks then `data: [DONE]\\n\\n`), GET /v1/models, GET /health, POST /tokenize,
POST /detokenize, GET /metrics (Prometheus).

Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for invalid JSON,
wrong types, out-of-range values and prompts that do not fit the context (vLLM's rule: prompt +
max_tokens must fit max_model_len), 401 for a missing or wrong key when `api_key` is set (on /v1,
/tokenize and /detokenize), 404 for an unknown model or route, 429 when `max_queued_requests`
requests already wait in the engine. A client that disconnects aborts its engine requests at once
(streams are cancelled by Starlette; non-streaming requests poll `is_disconnected`), which frees
their KV blocks. Bad input never gives a 500.

What this module does not know: sockets, signals, process lifetime (serve.py), scheduling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastserve.engine.async_engine import AsyncEngine, QueueFullError
from fastserve.engine.engine import EngineStats
from fastserve.engine.request import RequestOutput, SamplingParams
from fastserve.errors import FastServeError
from fastserve.server import protocol as p
from fastserve.server.limits import (
    BodyTooLarge,
    ClientGone,
    ServerLimits,
    parse_json,
    read_body,
)
from fastserve.server.metrics import CONTENT_TYPE, ServerMetrics
from fastserve.server.openapi import openapi_schema
from fastserve.server.responses import (
    ChatStreamState,
    CompletionStreamState,
    PromptInfo,
    chat_choices,
    completion_choices,
    usage,
)
from fastserve.server.streams import ClientDisconnected, until_disconnected

logger = logging.getLogger("fastserve.server")


class APIError(Exception):
    """An error the client caused (or a server failure), sent as OpenAI's error JSON."""

    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


_LARGE_BODY_BYTES = 1 << 20  # bodies above this are parsed in a worker thread


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, None)


def _param_of(message: str) -> str | None:
    """SamplingParams' messages start with the parameter's name ("temperature must be ...")."""
    head = message.split(" ", 1)[0].rstrip(":")
    return head if head.isidentifier() else None


# Line separators that JSON leaves raw but that clients splitting lines with str.splitlines
# (httpx's aiter_lines) would break an SSE event at; inside JSON strings only, so escaping them is
# lossless.
_SSE_ESCAPES = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(model: BaseModel | dict) -> str:
    body = model.model_dump_json() if isinstance(model, BaseModel) else json.dumps(model)
    return f"data: {body.translate(_SSE_ESCAPES)}\n\n"


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


class OpenAIServer:
    """The state behind one app: the engine, the model's name, limits and metrics."""

    def __init__(
        self,
        engine: AsyncEngine,
        served_model_name: str,
        api_key: str | None = None,
        limits: ServerLimits | None = None,
        model_root: str | None = None,
    ) -> None:
        self.engine = engine
        self.llm = engine.engine
        self.tokenizer = self.llm.tokenizer
        self.model_name = served_model_name
        self.api_key = api_key
        self.limits = limits or ServerLimits()
        self.model_root = model_root
        self.metrics = ServerMetrics(served_model_name)

    # ---- shared checks -------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise APIError(
                401,
                "Incorrect or missing API key.",
                "authentication_error",
                None,
                "invalid_api_key",
            )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist (this server serves `{self.model_name}`).",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    async def parse(self, request: Request, schema: type[BaseModel]) -> BaseModel:
        self.check_auth(request)
        try:
            raw = await read_body(request, self.limits.max_body_bytes)
        except BodyTooLarge as exc:
            raise APIError(
                413, str(exc), "invalid_request_error", None, "request_too_large"
            ) from None
        try:
            if len(raw) > _LARGE_BODY_BYTES:  # its vectorised depth check releases the GIL
                body = await asyncio.to_thread(parse_json, raw, self.limits.max_json_depth)
            else:
                body = parse_json(raw, self.limits.max_json_depth)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        try:
            req = schema.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = str(err["loc"][0]) if err["loc"] else None
            where = ".".join(str(x) for x in err["loc"])
            raise bad_request(f"{where}: {err['msg']}", param) from None
        if hasattr(req, "check"):
            try:
                req.check()
            except ValueError as exc:
                raise bad_request(str(exc), _param_of(str(exc))) from None
        self.check_model(getattr(req, "model", None))
        return req

    def engine_stats(self) -> EngineStats:
        return self.engine.stats()  # under the engine's lock: blocks for one step at most

    def check_running(self) -> None:
        if not self.engine.is_running:
            raise APIError(503, "The engine has stopped.", "server_error", None, None)

    def check_size(self, prompts: list[PromptInfo], params: list[SamplingParams]) -> None:
        """The request's own size against the limits, before it is admitted."""
        num_seqs = sum(sp.n for sp in params)
        limit = self.limits.max_queued_requests
        if num_seqs > limit:
            raise bad_request(
                f"n ({params[0].n}) times the number of prompts ({len(prompts)}) is "
                f"{num_seqs} sequences, more than max_queued_requests={limit}.",
                "n",
            )
        token_limit = self.limits.max_request_tokens
        if token_limit is not None:
            num_tokens = sum(
                (len(p.token_ids) + sp.max_tokens) * sp.n for p, sp in zip(prompts, params)
            )
            if num_tokens > token_limit:
                raise bad_request(
                    f"The request asks for {num_tokens} tokens (prompt + max_tokens, times n, "
                    f"over its prompts), more than this server's max_request_tokens="
                    f"{token_limit}.",
                    "max_tokens",
                )

    async def encode(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """Tokenize in a worker thread with the GIL released (the tokenizers library holds it
        in a single `encode`, not in a batch), so a long prompt never stalls other streams."""
        ids = await asyncio.to_thread(self.tokenizer.encode_batch, texts)
        if add_bos:
            if self.tokenizer.bos_token_id is None:
                raise FastServeError("this tokenizer has no bos token, so add_bos is not possible")
            ids = [[self.tokenizer.bos_token_id, *row] for row in ids]
        return ids

    def resolve_max_tokens(self, num_prompt: int, requested: int | None, param: str) -> int:
        """vLLM's rule: prompt + max_tokens must fit the context; None -> fill the context.
        (The prompt itself is checked once, by the engine when the request is admitted.)"""
        limit = self.llm.max_model_len
        prompt_param = "prompt" if param == "max_tokens" else "messages"
        if requested is None:
            if num_prompt >= limit:
                raise bad_request(
                    f"The prompt has {num_prompt} tokens and fills this model's maximum context "
                    f"length of {limit} tokens; nothing can be generated.",
                    prompt_param,
                )
            return limit - num_prompt
        if num_prompt + requested > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} in the "
                f"completion). Please reduce the prompt or {param}.",
                prompt_param if num_prompt > limit else param,
            )
        return requested

    def sampling_params(self, build, max_tokens: int) -> SamplingParams:
        try:
            return build(max_tokens)
        except ValueError as exc:
            raise bad_request(str(exc), _param_of(str(exc))) from None

    def decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def on_finished(self, request_id: str, out: RequestOutput) -> None:
        """Latency histograms and the per-request log line."""
        self.metrics.observe_finished(out)
        m = out.metrics
        ttft = f"{m.ttft_s:.3f}s" if m and m.ttft_s is not None else "-"
        e2e = f"{m.e2e_s:.3f}s" if m and m.e2e_s is not None else "-"
        reasons = ",".join(sorted({str(o.finish_reason) for o in out.outputs}))
        logger.info(
            "%s prompt_tokens=%d output_tokens=%d ttft=%s e2e=%s finish=%s",
            request_id,
            len(out.prompt_token_ids),
            sum(len(o.token_ids) for o in out.outputs),
            ttft,
            e2e,
            reasons,
        )

    async def start(
        self,
        request: Request,
        request_id: str,
        prompts: list[PromptInfo],
        params: list[SamplingParams],
        priority: int,
    ) -> tuple[tuple[int, RequestOutput], AsyncIterator[tuple[int, RequestOutput]]]:
        """Admit the request's sequences at once (429 when the waiting queue is full, 400 for an
        invalid request) and return its first output and the stream of the rest: both before
        the HTTP status is sent, so these errors keep their status codes."""
        self.check_running()
        self.check_size(prompts, params)
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        merged = self.engine.generate_many(
            [pr.token_ids for pr in prompts],
            params,
            ids,
            priority=priority,
            max_waiting=self.limits.max_queued_requests,
        )
        outputs = self._recorded(request_id, merged)
        try:
            first = await until_disconnected(request, anext(outputs))
        except QueueFullError as exc:
            await outputs.aclose()
            raise APIError(429, str(exc), "rate_limit_error", None, "queue_full") from None
        except ValueError as exc:
            await outputs.aclose()
            raise bad_request(str(exc), _param_of(str(exc))) from None
        except BaseException:
            await outputs.aclose()
            raise
        return first, outputs

    async def _recorded(self, request_id: str, merged) -> AsyncIterator[tuple[int, RequestOutput]]:
        async with contextlib.aclosing(merged) as outputs:
            async for i, out in outputs:
                # one failed sequence fails the request at once (its other sequences are aborted
                # when the stream closes)
                failed = [o for o in out.outputs if o.finish_reason == "error"]
                if out.finished or failed:
                    self.on_finished(f"{request_id}-{i}", out)
                if failed:
                    raise APIError(500, str(failed[0].stop_reason), "server_error")
                yield i, out

    # ---- completions ---------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        req: p.CompletionRequest = await self.parse(request, p.CompletionRequest)
        raw_prompts = req.prompts()
        texts = [r for r in raw_prompts if isinstance(r, str)]
        encoded = iter(await self.encode(texts)) if texts else iter(())
        prompts, params = [], []
        scoring_only = req.max_tokens == 0
        for raw in raw_prompts:
            ids = next(encoded) if isinstance(raw, str) else list(raw)
            text = raw if isinstance(raw, str) else None  # decoded once the engine checked it
            prompts.append(PromptInfo(ids, text, req.echo, scoring_only))
            if scoring_only:  # run the prompt, sample one token, drop it
                self.resolve_max_tokens(len(ids), 0, "max_tokens")
                max_tokens = 1
            else:
                max_tokens = self.resolve_max_tokens(len(ids), req.max_tokens, "max_tokens")
            params.append(self.sampling_params(req.sampling_params, max_tokens))
        rid = f"cmpl-{uuid.uuid4().hex}"
        first, outputs = await self.start(request, rid, prompts, params, req.priority)
        for pr in prompts:
            if pr.text is None:
                pr.text = self.tokenizer.decode(pr.token_ids, False)
        if req.stream:
            return self._stream(self._completion_chunks(rid, req, prompts, first, outputs))
        finals: dict[int, RequestOutput] = {}

        async def collect() -> None:
            async with contextlib.aclosing(outputs):
                for i, out in [first]:
                    if out.finished:
                        finals[i] = out
                async for i, out in outputs:
                    if out.finished:
                        finals[i] = out

        await until_disconnected(request, collect())
        ordered = [finals[i] for i in range(len(prompts))]
        choices = [
            c
            for i, out in enumerate(ordered)
            for c in completion_choices(out, prompts[i], i, req.n, req.logprobs, self.decode_one)
        ]
        return _json(
            p.CompletionResponse(
                id=rid, model=self.model_name, choices=choices, usage=usage(prompts, ordered)
            )
        )

    async def _completion_chunks(self, rid, req, prompts, first, outputs) -> AsyncIterator[str]:
        state = CompletionStreamState(req.n, req.logprobs, self.decode_one)
        created = int(time.time())
        finals: dict[int, RequestOutput] = {}

        def chunk(choices, usage_=None) -> str:
            return _sse(
                p.CompletionChunk(
                    id=rid, created=created, model=self.model_name, choices=choices, usage=usage_
                )
            )

        async with contextlib.aclosing(outputs):
            try:
                pending = [first]
                while True:
                    for i, out in pending:
                        if out.finished:
                            finals[i] = out
                        choices = state.chunk_choices(out, prompts[i], i)
                        if choices:
                            yield chunk(choices)
                    nxt = await anext(outputs, None)
                    if nxt is None:
                        break
                    pending = [nxt]
                if req.include_usage:
                    ordered = [finals[i] for i in range(len(prompts))]
                    yield chunk([], usage(prompts, ordered))
            except (ValueError, APIError) as exc:
                yield _sse(_error_json(exc))
        yield "data: [DONE]\n\n"

    # ---- chat completions ----------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        req: p.ChatCompletionRequest = await self.parse(request, p.ChatCompletionRequest)
        try:
            text = self.tokenizer.apply_chat_template(
                req.template_messages(), add_generation_prompt=True
            )
        except (ValueError, FastServeError) as exc:
            raise bad_request(f"cannot apply the chat template: {exc}", "messages") from None
        (ids,) = await self.encode([text])
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.resolve_max_tokens(len(ids), req.requested_max_tokens, param)
        params = self.sampling_params(req.sampling_params, max_tokens)
        prompt = PromptInfo(ids, text)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        first, outputs = await self.start(request, rid, [prompt], [params], req.priority)
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.stream:
            return self._stream(self._chat_chunks(rid, req, prompt, top, first, outputs))
        final: list[RequestOutput] = [first[1]]

        async def collect() -> None:
            async with contextlib.aclosing(outputs):
                async for _, out in outputs:
                    final[0] = out

        await until_disconnected(request, collect())
        return _json(
            p.ChatCompletionResponse(
                id=rid,
                model=self.model_name,
                choices=chat_choices(final[0], top, self.decode_one),
                usage=usage([prompt], final),
            )
        )

    async def _chat_chunks(self, rid, req, prompt, top, first, outputs) -> AsyncIterator[str]:
        state = ChatStreamState(req.n, top, self.decode_one)
        created = int(time.time())

        def chunk(choices, usage_=None) -> str:
            return _sse(
                p.ChatCompletionChunk(
                    id=rid, created=created, model=self.model_name, choices=choices, usage=usage_
                )
            )

        async with contextlib.aclosing(outputs):
            try:
                yield chunk(state.role_choices())
                out = first[1]
                while True:
                    choices = state.chunk_choices(out)
                    if choices:
                        yield chunk(choices)
                    if out.finished:
                        break
                    nxt = await anext(outputs, None)
                    if nxt is None:
                        break
                    out = nxt[1]
                if req.include_usage:
                    yield chunk([], usage([prompt], [out]))
            except (ValueError, APIError) as exc:
                yield _sse(_error_json(exc))
        yield "data: [DONE]\n\n"

    def _stream(self, chunks: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(
            chunks,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ---- small endpoints -----------------------------------------------------------------------

    async def tokenize(self, request: Request) -> Response:
        req: p.TokenizeRequest = await self.parse(request, p.TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            try:
                msgs = p.ChatCompletionRequest(messages=req.messages).template_messages()
                text = self.tokenizer.apply_chat_template(
                    msgs, add_generation_prompt=req.add_generation_prompt
                )
            except (ValueError, FastServeError) as exc:
                raise bad_request(str(exc), "messages") from None
        else:
            text = req.prompt
        try:
            (ids,) = await self.encode([text], add_bos=req.add_special_tokens)
        except FastServeError as exc:
            raise bad_request(str(exc), "add_special_tokens") from None
        return _json(
            p.TokenizeResponse(count=len(ids), max_model_len=self.llm.max_model_len, tokens=ids)
        )

    async def detokenize(self, request: Request) -> Response:
        req: p.DetokenizeRequest = await self.parse(request, p.DetokenizeRequest)
        vocab = self.llm.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise bad_request(f"tokens must be integers in [0, {vocab})", "tokens")
        return _json(p.DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens, False)))

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        card = p.ModelCard(
            id=self.model_name, root=self.model_root, max_model_len=self.llm.max_model_len
        )
        return _json(p.ModelList(data=[card]))

    async def health(self, request: Request) -> Response:
        if not self.engine.is_running:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, request: Request) -> Response:
        stats = await asyncio.to_thread(self.engine_stats)
        return Response(self.metrics.render(stats), media_type=CONTENT_TYPE)


def _error_json(exc: Exception) -> dict:
    if isinstance(exc, APIError):
        return p.error_body(exc.message, exc.type, exc.param, exc.code)
    return p.error_body(str(exc), "invalid_request_error", None, None)


def build_app(
    async_engine: AsyncEngine,
    served_model_name: str,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    model_root: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `async_engine` as `served_model_name` (the caller owns the
    engine's lifetime). `api_key` None: no authentication; `limits` None: ServerLimits()."""
    server = OpenAIServer(async_engine, served_model_name, api_key, limits, model_root)
    app = FastAPI(title="FastServe", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
        else:
            logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
        return JSONResponse(_error_json(exc), status_code=exc.status)

    @app.exception_handler(ClientDisconnected)
    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: Exception) -> Response:
        logger.info("%s %s: client disconnected, request aborted", request.method, request.url)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = p.error_body(str(exc.detail), type_, None, None)
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        body = p.error_body(f"internal error: {type(exc).__name__}", "server_error", None, None)
        return JSONResponse(body, status_code=500)

    # Handlers parse their own bodies (limits, strict schemas, OpenAI's errors); the OpenAPI
    # document still describes each body, for clients and for schema fuzzing.
    for path, handler, body in (
        ("/v1/completions", server.completions, p.CompletionRequest),
        ("/v1/chat/completions", server.chat, p.ChatCompletionRequest),
        ("/tokenize", server.tokenize, p.TokenizeRequest),
        ("/detokenize", server.detokenize, p.DetokenizeRequest),
    ):
        app.add_api_route(path, handler, methods=["POST"], openapi_extra={"x-body": body.__name__})
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_endpoint, methods=["GET"])
    app.openapi = lambda: openapi_schema(app)
    return app
