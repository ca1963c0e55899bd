"""Engine outputs -> OpenAI responses and stream chunks (completions and chat completions).

    prompt = PromptInfo(token_ids=[5, 6, 7], text="abc", echo=True, scoring_only=False)
    choices = completion_choices(final_output, prompt, prompt_index=0, n=1, logprobs=1)
    stream = CompletionStreamState(...); stream.chunk_choices(output, prompt, prompt_index)

Choice indices follow OpenAI: prompt i, sample j -> index i * n + j. Completions logprobs (with
echo) cover the prompt tokens then the generated ones; `text_offset` indexes into the choice's
`text` (which starts with the prompt when echoing), as in vLLM. Logprobs of -inf are clamped to
-9999.0 (JSON has no infinities), as vLLM does.

What this module does not know: HTTP, SSE framing, the engine's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastserve.engine.request import CompletionOutput, Logprob, RequestOutput
from fastserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    DeltaMessage,
    TopLogprob,
    Usage,
)

_MIN_LOGPROB = -9999.0


def _lp(value: float) -> float:
    return max(value, _MIN_LOGPROB)


@dataclass
class PromptInfo:
    """One prompt of a request as the server resolved it."""

    token_ids: list[int]
    text: str | None  # the user's text, or the decoded ids (what echo returns)
    echo: bool = False
    # max_tokens=0 with echo: one token is generated to run the prompt and then dropped
    scoring_only: bool = False


def generated(o: CompletionOutput, prompt: PromptInfo) -> tuple[str, list[int], list | None]:
    """(text, token ids, logprobs) of an output, empty for a scoring-only request."""
    if prompt.scoring_only:
        return "", [], [] if o.logprobs is not None else None
    return o.text, o.token_ids, o.logprobs


def finish_reason(o: CompletionOutput, prompt: PromptInfo) -> str | None:
    if prompt.scoring_only and o.finish_reason is not None:
        return "length"
    return o.finish_reason


def usage(prompts: list[PromptInfo], outputs: list[RequestOutput]) -> Usage:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(
        len(generated(o, p)[1]) for p, out in zip(prompts, outputs) for o in out.outputs
    )
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


# ---- completions -------------------------------------------------------------------------------


def completion_logprobs(
    token_ids: list[int],
    entries: list[dict[int, Logprob] | None],
    text_offset: int,
    decode,
    into: CompletionLogprobs | None = None,
) -> CompletionLogprobs:
    """OpenAI's completions logprobs of `token_ids`; an entry of None (the first prompt token)
    gives a null logprob and a null top_logprobs."""
    lp = into or CompletionLogprobs()
    for tid, entry in zip(token_ids, entries):
        if entry is None:
            token, value, top = decode(tid), None, None
        else:
            chosen = entry[tid]
            token = chosen.decoded_token if chosen.decoded_token is not None else decode(tid)
            value = _lp(chosen.logprob)
            top = {}
            for t, v in entry.items():  # tokens with the same text (byte pieces): keep the max
                key = _text(v, t, decode)
                top[key] = max(top.get(key, _MIN_LOGPROB), _lp(v.logprob))
        lp.tokens.append(token)
        lp.token_logprobs.append(value)
        lp.top_logprobs.append(top)
        lp.text_offset.append(text_offset)
        text_offset += len(token)
    return lp


def _text(lp: Logprob, token_id: int, decode) -> str:
    return lp.decoded_token if lp.decoded_token is not None else decode(token_id)


def completion_choices(
    out: RequestOutput, prompt: PromptInfo, prompt_index: int, n: int, logprobs: int | None, decode
) -> list[CompletionChoice]:
    choices = []
    for o in out.outputs:
        text, token_ids, entries = generated(o, prompt)
        head = prompt.text if prompt.echo else ""
        lp = None
        if logprobs is not None:
            lp = CompletionLogprobs()
            if prompt.echo:
                completion_logprobs(prompt.token_ids, out.prompt_logprobs or [], 0, decode, lp)
            completion_logprobs(token_ids, entries or [], len(head), decode, lp)
        choices.append(
            CompletionChoice(
                index=prompt_index * n + o.index,
                text=head + text,
                logprobs=lp,
                finish_reason=finish_reason(o, prompt),
                stop_reason=o.stop_reason,
            )
        )
    return choices


@dataclass
class _Sent:
    """What a stream has sent of one choice so far."""

    num_chars: int = 0  # generated text (the echoed prompt excluded)
    num_tokens: int = 0
    text_offset: int = 0  # of the next token in the choice's streamed text (logprobs)
    started: bool = False  # first chunk (echo / role) sent
    finished: bool = False


@dataclass
class CompletionStreamState:
    n: int
    logprobs: int | None
    decode: object
    sent: dict[int, _Sent] = field(default_factory=dict)

    def chunk_choices(
        self, out: RequestOutput, prompt: PromptInfo, prompt_index: int
    ) -> list[CompletionChoice]:
        """The deltas of `out` (cumulative) since the last call, one choice per changed output;
        the first chunk of a choice starts with the prompt when echoing."""
        choices = []
        for o in out.outputs:
            index = prompt_index * self.n + o.index
            s = self.sent.setdefault(index, _Sent())
            if s.finished:
                continue
            text, token_ids, entries = generated(o, prompt)
            reason = finish_reason(o, prompt)
            head = prompt.text if prompt.echo and not s.started else ""
            delta = text[s.num_chars :]
            new_ids = token_ids[s.num_tokens :]
            if s.started and not (delta or new_ids or reason):
                continue
            lp = None
            if self.logprobs is not None:
                lp = CompletionLogprobs()
                if head:
                    prompt_entries = out.prompt_logprobs or []
                    completion_logprobs(prompt.token_ids, prompt_entries, 0, self.decode, lp)
                    s.text_offset = len(head)
                before = len(lp.tokens)
                new_entries = (entries or [])[s.num_tokens :]
                completion_logprobs(new_ids, new_entries, s.text_offset, self.decode, lp)
                s.text_offset += sum(len(t) for t in lp.tokens[before:])
            s.started = True
            s.num_chars += len(delta)
            s.num_tokens = len(token_ids)
            s.finished = reason is not None
            choices.append(
                CompletionChoice(
                    index=index,
                    text=head + delta,
                    logprobs=lp,
                    finish_reason=reason,
                    stop_reason=o.stop_reason if reason is not None else None,
                )
            )
        return choices


# ---- chat completions --------------------------------------------------------------------------


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], top_k: int, decode
) -> ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry[tid]
        token = _text(chosen, tid, decode)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)[:top_k]
        top = [
            TopLogprob(
                token=_text(v, t, decode),
                logprob=_lp(v.logprob),
                bytes=list(_text(v, t, decode).encode()),
            )
            for t, v in ranked
        ]
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=_lp(chosen.logprob),
                bytes=list(token.encode()),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)


def chat_choices(out: RequestOutput, top_logprobs: int | None, decode) -> list[ChatChoice]:
    """`top_logprobs` None: no logprobs were asked for."""
    return [
        ChatChoice(
            index=o.index,
            message=AssistantMessage(content=o.text),
            logprobs=None
            if top_logprobs is None
            else chat_logprobs(o.token_ids, o.logprobs or [], top_logprobs, decode),
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
        )
        for o in out.outputs
    ]


@dataclass
class ChatStreamState:
    n: int
    top_logprobs: int | None  # None: no logprobs
    decode: object
    sent: dict[int, _Sent] = field(default_factory=dict)

    def role_choices(self) -> list[ChatChunkChoice]:
        """The first chunk: every choice announces the assistant role (as OpenAI streams do)."""
        return [
            ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
            for i in range(self.n)
        ]

    def chunk_choices(self, out: RequestOutput) -> list[ChatChunkChoice]:
        choices = []
        for o in out.outputs:
            s = self.sent.setdefault(o.index, _Sent())
            if s.finished:
                continue
            delta = o.text[s.num_chars :]
            new_ids = o.token_ids[s.num_tokens :]
            reason = o.finish_reason
            if not (delta or new_ids or reason):
                continue
            lp = None
            if self.top_logprobs is not None and new_ids:
                entries = (o.logprobs or [])[s.num_tokens :]
                lp = chat_logprobs(new_ids, entries, self.top_logprobs, self.decode)
            s.num_chars += len(delta)
            s.num_tokens = len(o.token_ids)
            s.finished = reason is not None
            choices.append(
                ChatChunkChoice(
                    index=o.index,
                    delta=DeltaMessage(content=delta if delta or not reason else None),
                    logprobs=lp,
                    finish_reason=reason,
                )
            )
        return choices
