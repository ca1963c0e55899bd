"""OpenAI API schemas (pydantic v2): what the server accepts and what it returns.

    req = CompletionRequest.model_validate({"prompt": "def main(", "max_tokens": 8})
    params = req.sampling_params(max_tokens=8)      # -> engine SamplingParams (ValueError if bad)

Requests tolerate unknown fields (as OpenAI does) but not wrong types: models are strict, so
`"max_tokens": "5"` or `"stream": 1` fail validation (the app turns that into a 400). Ranges are
checked by `SamplingParams` (vLLM's rules) when the engine parameters are built. Responses use
OpenAI's field names so the official `openai` client parses them.

What this module does not know: HTTP, the engine's state, tokenization.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from fastserve.engine.request import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_SEED,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)
from fastserve.server.limits import MAX_LOGIT_BIAS, MAX_PROMPTS


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


def _integral(value: Any) -> Any:
    """JSON Schema's integers include 1.0: accept integral floats for int fields (strict mode
    still refuses "5", true and 1.5)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]


def _doc(**schema) -> Any:
    """JSON-schema bounds for the OpenAPI document, from the constants that SamplingParams and
    the server enforce (the check stays there, with its message naming the field). `x-bound`
    marks a bound of the served model, filled in by openapi.py: "vocab" (top_k's maximum),
    "token" (a token id) or "context" (max_model_len)."""
    return Field(json_schema_extra=schema)


TokenId = Annotated[Int, _doc(minimum=0, **{"x-bound": "token"})]
StopString = Annotated[str, _doc(minLength=1, maxLength=MAX_STOP_STRING_CHARS)]


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests ----------------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions (OpenAI's plus vLLM's extras)."""

    model: Annotated[str | None, _doc(**{"x-bound": "model"})] = None
    n: Annotated[Int, _doc(minimum=1, maximum=MAX_N)] = 1
    # None -> 1.0 (OpenAI's default)
    temperature: Annotated[float | None, _doc(minimum=0)] = None
    top_p: Annotated[float | None, _doc(exclusiveMinimum=0, maximum=1)] = None
    stop: Annotated[StopString | list[StopString] | None, _doc(maxItems=MAX_STOP_STRINGS)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Annotated[Int | None, _doc(minimum=0, maximum=MAX_SEED - 1)] = None
    presence_penalty: Annotated[float, _doc(minimum=-2, maximum=2)] = 0.0
    frequency_penalty: Annotated[float, _doc(minimum=-2, maximum=2)] = 0.0
    user: str | None = None
    # rejected when non-empty (not supported)
    logit_bias: Annotated[dict[str, float] | None, _doc(maxProperties=0)] = None
    # vLLM extras
    top_k: Annotated[Int | None, _doc(minimum=-1, **{"x-bound": "vocab"})] = None
    min_p: Annotated[float | None, _doc(minimum=0, maximum=1)] = None
    repetition_penalty: Annotated[float | None, _doc(exclusiveMinimum=0)] = None
    stop_token_ids: Annotated[list[TokenId] | None, _doc(maxItems=MAX_STOP_TOKEN_IDS)] = None
    ignore_eos: bool = False
    min_tokens: Annotated[Int, _doc(minimum=0, **{"x-bound": "context"})] = 0
    priority: Annotated[Int, _doc(minimum=-(2**63), maximum=2**63 - 1)] = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        """Engine parameters; ValueError naming the parameter for an invalid value."""
        if self.logit_bias and len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must have at most {MAX_LOGIT_BIAS} entries")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    # A string, a list of strings, token ids, or a list of token-id lists (ids used as given).
    prompt: Annotated[
        Annotated[str, _doc(minLength=1)]
        | Annotated[list[Annotated[str, _doc(minLength=1)]], _doc(minItems=1)]
        | Annotated[list[TokenId], _doc(minItems=1, **{"x-bound": "context"})]
        | Annotated[list[Annotated[list[TokenId], _doc(minItems=1)]], _doc(minItems=1)],
        _doc(maxItems=MAX_PROMPTS),
    ]
    max_tokens: Annotated[Int | None, _doc(minimum=0, **{"x-bound": "context"})] = 16
    logprobs: Annotated[Int | None, _doc(minimum=0, maximum=MAX_LOGPROBS)] = None
    echo: bool = False
    best_of: Annotated[Int | None, _doc(minimum=1, maximum=MAX_N)] = None
    suffix: Annotated[str | None, _doc(maxLength=0)] = None  # not supported: only "" or null

    def check(self) -> None:
        """Cross-field rules pydantic does not express; ValueError naming the parameter."""
        if isinstance(self.prompt, list) and (
            not self.prompt or any(isinstance(p, list | str) and not p for p in self.prompt)
        ):
            raise ValueError("prompt must not be empty")
        if isinstance(self.prompt, str) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if len(self.prompts()) > MAX_PROMPTS:
            raise ValueError(f"prompt must be a list of at most {MAX_PROMPTS} prompts")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 (max_tokens=0 needs echo=true)")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """`max_tokens` resolved against the context by the caller (>= 1)."""
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


CHAT_ROLES = ("system", "developer", "user", "assistant")


class ContentPart(_Request):
    # the only part type served is text (another one gets a 400 saying so)
    model_config = ConfigDict(json_schema_extra={"required": ["type", "text"]})
    type: Annotated[str, _doc(enum=["text"])]
    text: str | None = None


class ChatMessage(_Request):
    role: Annotated[str, _doc(enum=list(CHAT_ROLES))]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"messages: content parts of type {part.type!r} are not supported")
            if part.text is None:
                raise ValueError("messages: a content part of type 'text' needs its text")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], _doc(minItems=1)]
    # deprecated by OpenAI in favour of max_completion_tokens
    max_tokens: Annotated[Int | None, _doc(minimum=1, **{"x-bound": "context"})] = None
    max_completion_tokens: Annotated[Int | None, _doc(minimum=1, **{"x-bound": "context"})] = None
    logprobs: bool = False
    top_logprobs: Annotated[Int | None, _doc(minimum=0, maximum=MAX_LOGPROBS)] = None

    def check(self) -> None:
        if not self.messages:
            raise ValueError("messages must not be empty")
        for m in self.messages:
            if m.role not in CHAT_ROLES:
                raise ValueError(f"messages: role must be one of {', '.join(CHAT_ROLES)}")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ValueError("top_logprobs needs logprobs=true")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"top_logprobs must be in [0, {MAX_LOGPROBS}]")
        for name in ("max_completion_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them ("developer" is OpenAI's new "system")."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, None)


class TokenizeRequest(_Request):
    model: Annotated[str | None, _doc(**{"x-bound": "model"})] = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False  # prepend bos (the tokenizer never adds it by itself)
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: Annotated[str | None, _doc(**{"x-bound": "model"})] = None
    tokens: list[TokenId]


# ---- responses ---------------------------------------------------------------------------------


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fastserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict:
    return ErrorResponse(
        error=ErrorInfo(message=message, type=type_, param=param, code=code)
    ).model_dump()
