"""Requests and what comes back: `SamplingParams`, `Request`, its status and metrics, and the
vLLM-shaped outputs (`RequestOutput`, `CompletionOutput`, `Logprob`).

    params = SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95, stop=["\\n\\n"], seed=0)
    req = Request("r0", prompt_token_ids=[0, 17, 42], sampling_params=params, eos_token_id=1)
    req.append_output_token(token_id, now=time.monotonic())
    if check_stop(req, max_model_len=2048): ...   # eos / stop_token_ids / max_tokens / context

`SamplingParams` uses vLLM's names, defaults and checks: a bad value raises ValueError naming the
parameter ("temperature must be >= 0, got -1"). One `Request` is one sequence; a request with
n > 1 is fanned out by the engine into n children built with `params.for_child(i)` (vLLM v1:
child i gets seed + i, so a seeded parent gives n different but reproducible samples).

What this module does not know: tensors, tokenization, queues or KV blocks. It never decides
stop strings (the detokenizer does) and never changes scheduler-owned fields.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from dataclasses import dataclass, field

import torch

SAMPLING_EPS = 1e-5  # temperature below this is greedy (vLLM's _SAMPLING_EPS)

# ---- the bounds of a request, defined once: the offline API raises ValueError naming the field,
# the server answers 400 with the same message (docs/server.md lists them) ----
MAX_N = 128  # sequences per prompt (OpenAI's bound on n)
MAX_LOGPROBS = 20  # top logprobs per token (vLLM's default max_logprobs; OpenAI's chat bound)
MAX_SEED = 2**63  # seeds live in [0, 2^63): child i of an n > 1 request uses seed + i < 2^64
MAX_STOP_STRINGS = 64  # stop strings per request
MAX_STOP_STRING_CHARS = 1024  # characters per stop string (the detokenizer holds back as many)
MAX_STOP_TOKEN_IDS = 1024  # stop_token_ids per request
MAX_INT = 2**63 - 1  # any other integer field (max_tokens, min_tokens, priority) fits int64


@dataclass
class SamplingParams:
    # Sequences to return for the prompt (the engine fans out n child requests).
    n: int = 1
    # Generated tokens at most; None -> until the sequence fills the model's context.
    max_tokens: int | None = 16
    # eos, stop_token_ids and stop strings are ignored until this many tokens are generated.
    min_tokens: int = 0
    # Softmax temperature; 0 (below 1e-5) means greedy, which also resets top_p/top_k/min_p.
    temperature: float = 1.0
    # Nucleus: keep the most likely tokens until their probability reaches top_p.
    top_p: float = 1.0
    # Keep the top_k most likely tokens (ties at the k-th value kept); 0 or -1 -> off (stored 0).
    top_k: int = 0
    # Drop tokens with probability < min_p * (probability of the most likely token).
    min_p: float = 0.0
    # HF/vLLM: logits of tokens seen in prompt or output: positive / rp, negative * rp.
    repetition_penalty: float = 1.0
    # OpenAI: logit -= presence_penalty for every token present in the output so far.
    presence_penalty: float = 0.0
    # OpenAI: logit -= frequency_penalty * (count of the token in the output so far).
    frequency_penalty: float = 0.0
    # Stop strings (a str is wrapped in a list; None -> []); matched across token boundaries.
    stop: list[str] | str | None = None
    # Token ids that stop generation like eos (the token stays in token_ids; None -> []).
    stop_token_ids: list[int] | None = None
    # Keep the matched stop string at the end of the text.
    include_stop_str_in_output: bool = False
    # Do not stop at eos (and do not mask it for min_tokens).
    ignore_eos: bool = False
    # Per-request seed: the same tokens whatever else is in the batch.
    seed: int | None = None
    # Top-k logprobs per generated token, plus the sampled token's; None -> none.
    logprobs: int | None = None
    # Same for prompt tokens (the first prompt token has None).
    prompt_logprobs: int | None = None
    # FastServe's extension for scoring: prompt logprobs only from this prompt position on
    # (earlier entries are None), so the first prompt_logprobs_start - 1 tokens may come from the
    # prefix cache (a shared context scored once for all its continuations). 0: every position,
    # no prefix reuse (vLLM's behaviour).
    prompt_logprobs_start: int = 0
    # Drop special tokens (bos, eos, pad ...) from the output text.
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, list | tuple):
                raise ValueError(f"{name} must be a list, got {type(value).__name__}")
            setattr(self, name, list(value) if value else [])
        self._validate()
        if self.top_k == -1:
            self.top_k = 0
        if self.temperature < SAMPLING_EPS:  # greedy: the filters cannot change the argmax
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _validate(self) -> None:
        def fail(name: str, rule: str) -> None:
            try:
                value = repr(getattr(self, name))
            except ValueError:  # repr(10**5000) raises (Python's int digit limit)
                value = f"a {type(getattr(self, name)).__name__} too large to print"
            value = value if len(value) <= 60 else value[:57] + "..."
            raise ValueError(f"{name} must be {rule}, got {value}")

        def is_int(v: object, lo: int = -MAX_INT - 1, hi: int = MAX_INT) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

        def is_num(v: object) -> bool:  # a finite float (a huge int cannot become one)
            if isinstance(v, bool) or not isinstance(v, int | float):
                return False
            return abs(v) <= MAX_INT if isinstance(v, int) else math.isfinite(v)

        if not is_int(self.n, 1, MAX_N):
            fail("n", f"an integer in [1, {MAX_N}]")
        if self.max_tokens is not None and not is_int(self.max_tokens, 1):
            fail("max_tokens", f"None or an integer in [1, {MAX_INT}]")
        if not is_int(self.min_tokens, 0):
            fail("min_tokens", f"an integer in [0, {MAX_INT}]")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"<= max_tokens ({self.max_tokens})")
        if not is_num(self.temperature) or self.temperature < 0:
            fail("temperature", "a finite number >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]")
        if not is_int(self.top_k, -1):
            fail("top_k", "0 or -1 (off) or an integer >= 1 (at most the vocabulary size)")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                fail(name, "in [-2, 2]")
        if len(self.stop) > MAX_STOP_STRINGS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop
        ):
            fail(
                "stop",
                f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
                f"of at most {MAX_STOP_STRING_CHARS} characters",
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(
            is_int(t, 0) for t in self.stop_token_ids
        ):
            fail("stop_token_ids", f"a list of at most {MAX_STOP_TOKEN_IDS} token ids >= 0")
        if self.seed is not None and not is_int(self.seed, 0, MAX_SEED - 1):
            fail("seed", "None or an integer in [0, 2^63)")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not is_int(v, 0, MAX_LOGPROBS):
                fail(name, f"None or an integer in [0, {MAX_LOGPROBS}]")
        if not is_int(self.prompt_logprobs_start, 0):
            fail("prompt_logprobs_start", f"an integer in [0, {MAX_INT}]")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "a bool")

    def verify(self, vocab_size: int) -> None:
        """The bounds that depend on the model: top_k and stop_token_ids within the vocabulary
        (the engine calls this when a request is added). ValueError naming the parameter."""
        if self.top_k > vocab_size:
            raise ValueError(
                f"top_k must be at most the vocabulary size ({vocab_size}), got {self.top_k}"
            )
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {bad[0]}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def masked_token_ids(self, eos_token_id: int | None) -> list[int]:
        """Ids that min_tokens masks and that stop generation: stop_token_ids, plus eos unless
        ignore_eos (vLLM's all_stop_token_ids)."""
        ids = list(self.stop_token_ids)
        if eos_token_id is not None and not self.ignore_eos and eos_token_id not in ids:
            ids.append(eos_token_id)
        return ids

    def for_child(self, index: int) -> SamplingParams:
        """The params of child `index` of an n > 1 request: n=1, seed + index (vLLM v1)."""
        if self.n == 1 and index == 0:
            return self  # the only child: the same parameters (no copy to validate again)
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # lost its KV; waits to recompute it
    SWAPPED = "swapped"  # KV lives in the host tier; waits to be swapped back in
    FINISHED_STOPPED = "finished_stopped"  # eos, a stop token or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or the model's context
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """ "stop" | "length" | "abort" | "error" for finished states, else None."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class RequestMetrics:
    # All times are time.monotonic() seconds.
    arrival_time: float
    # First step that computed any of the request's tokens.
    first_scheduled_time: float | None = None
    # When the first output token was appended.
    first_token_time: float | None = None
    # When each output token was appended (token_times[0] == first_token_time).
    token_times: list[float] = field(default_factory=list)
    # When the request reached a finished state.
    finished_time: float | None = None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float | None:
        """End-to-end latency = job completion time (JCT)."""
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (num_output_tokens - 1)."""
        e2e, ttft, n = self.e2e_s, self.ttft_s, len(self.token_times)
        if e2e is None or ttft is None or n < 2:
            return None
        return (e2e - ttft) / (n - 1)

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies (len = num_output_tokens - 1)."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def queue_s(self) -> float | None:
        """Time from arrival to the first step that ran it."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


@dataclass
class Request:
    # Unique id (children of an n > 1 request: f"{parent}-{i}" or whatever the engine picks).
    request_id: str
    # The prompt; never empty (at least one token must be computed to produce logits).
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # The tokenizer's eos (None -> only stop_token_ids, stop strings and lengths stop it).
    eos_token_id: int | None = None
    # time.monotonic() when the request arrived.
    arrival_time: float = field(default_factory=time.monotonic)
    # Lower value = more important (vLLM convention).
    priority: int = 0
    # Prompt text when the user gave text (echoed in RequestOutput.prompt).
    prompt: str | None = None
    # Id of the n > 1 request this child belongs to, and its index among the n outputs.
    parent_id: str | None = None
    index: int = 0
    # Tokens generated so far (eos / stop token included when one stopped it).
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache (vLLM v1); the scheduler schedules
    # num_tokens - num_computed_tokens more. Reset to 0 by a recompute preemption.
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    # The stop token id or stop string that finished it; None for eos or length.
    stop_reason: int | str | None = None
    # Human-readable cause of FINISHED_ERROR.
    error: str | None = None
    # ---- scheduler-owned state (written only by scheduler.py) ----
    queue_level: int = 0  # MLFQ queue index (0 = highest priority)
    quantum_used_s: float = 0.0  # estimated service time used in the current queue
    last_run_time: float | None = None  # None -> arrival_time (set in __post_init__)
    num_preemptions: int = 0
    # ---- engine-owned ----
    # Per-request sampling RNG, seeded once from sampling_params.seed (CPU); None when unseeded.
    # It survives preemption, so a recomputed request continues the same random stream.
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)
    metrics: RequestMetrics | None = None  # None -> RequestMetrics(arrival_time)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"prompt_token_ids of request {self.request_id!r} must not be empty")
        if self.last_run_time is None:
            self.last_run_time = self.arrival_time
        if self.metrics is None:
            self.metrics = RequestMetrics(self.arrival_time)
        if self.generator is None and self.sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling_params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int, now: float | None = None) -> None:
        """Record a sampled token and its time; num_computed_tokens is the scheduler's."""
        now = time.monotonic() if now is None else now
        self.output_token_ids.append(int(token_id))
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.token_times.append(now)

    def finish(
        self, status: RequestStatus, stop_reason: int | str | None = None, now: float | None = None
    ) -> None:
        """Move to a finished `status`, setting finish_reason, stop_reason and finished_time."""
        if not status.is_finished:
            raise ValueError(f"status must be a finished state, got {status}")
        self.status = status
        self.finish_reason = status.finish_reason
        self.stop_reason = stop_reason
        self.metrics.finished_time = time.monotonic() if now is None else now


def check_prompt(token_ids: list[int], vocab_size: int, max_model_len: int) -> list[int]:
    """The one check of a tokenized prompt (the engine's, which the server relies on): not
    empty, every id a token of the vocabulary, no longer than the context. ValueError naming
    the prompt; returns the ids as a list."""
    ids = list(token_ids)
    if not ids:
        raise ValueError("prompt must not be empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    if len(ids) > max_model_len:
        raise ValueError(
            f"prompt has {len(ids)} tokens, more than this model's maximum context length "
            f"(max_model_len={max_model_len})"
        )
    return ids


def check_stop(request: Request, max_model_len: int, now: float | None = None) -> bool:
    """After a token was appended: finish the request (and return True) when the token is eos
    (unless ignore_eos) or in stop_token_ids, once min_tokens are generated; or when max_tokens
    is reached or the sequence fills max_model_len. Stop strings are the detokenizer's job.
    Mirrors vLLM v1's check_stop: a stop token at the last allowed position reports "stop"."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens and request.output_token_ids:
        last = request.output_token_ids[-1]
        if not params.ignore_eos and last == request.eos_token_id:
            request.finish(RequestStatus.FINISHED_STOPPED, None, now)
            return True
        if last in params.stop_token_ids:
            request.finish(RequestStatus.FINISHED_STOPPED, last, now)
            return True
    max_tokens = params.max_tokens
    if request.num_tokens >= max_model_len or (
        max_tokens is not None and request.num_output_tokens >= max_tokens
    ):
        request.finish(RequestStatus.FINISHED_LENGTH, None, now)
        return True
    return False


@dataclass
class Logprob:
    # log p(token) under log_softmax of the raw model logits.
    logprob: float
    # 1-based rank among the vocabulary (1 = most likely); None when unknown.
    rank: int | None = None
    # The token's text, when a tokenizer was at hand.
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    # Index among the request's n outputs.
    index: int
    # Generated text so far (stop string excluded unless include_stop_str_in_output).
    text: str
    # Generated token ids so far.
    token_ids: list[int]
    # Sum of the sampled tokens' logprobs; None when logprobs were not asked for.
    cumulative_logprob: float | None = None
    # Per generated token: {token id: Logprob} of the sampled token and the top-k.
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id / stop string, if one finished it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    # Prompt text, when the prompt was given as text.
    prompt: str | None
    prompt_token_ids: list[int]
    # Per prompt token: {token id: Logprob}; the first entry is None (nothing predicts it).
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    # One per child sequence (n of them), ordered by index.
    outputs: list[CompletionOutput]
    # True when every output has finished.
    finished: bool
    metrics: RequestMetrics | None = None
