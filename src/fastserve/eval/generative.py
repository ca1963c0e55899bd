"""Generative tasks (lm-evaluation-harness's `generate_until`): documents with a prompt or chat
messages and their reference outputs, generated through the serving engine and scored by
gen_metrics.py.

    task = load_task("replies.jsonl")                   # tasks.py: a GenTask for these rows
    options = GenOptions.parse("max_gen_toks=64", apply_chat_template=False)
    batch = prepare_generation(task, TokenizerPrompts(tok), max_len, options, limit)
    entry = run_gen_task(task, batch, EngineGenerator(engine), options)   # its results entry

Documents: a jsonl row is `{"prompt": str}` or `{"messages": [{"role", "content"}, ...]}` with
`"reference": str` or `"references": [str, ...]` and an optional `"id"`; a YAML task file with
`output_type: generate_until` renders doc_to_text and doc_to_target (task_yaml.py).

Prompts: description + few-shot examples (text + target_delimiter + first reference +
fewshot_delimiter) + the doc's text, as for log-likelihood tasks, encoded without special tokens
(lm-eval's default add_bos_token=False). A messages row, or any prompt under
`apply_chat_template` (the description as a system message, the rest as one user message:
lm-eval's --apply_chat_template without --fewshot_as_multiturn), is the tokenizer's chat
template with the generation prompt, encoded as the server encodes it. max_gen_toks is clipped
so that prompt + output fits the model's context; a prompt that fills the context is an error
naming the doc (lm-eval cuts such a prompt from the left instead).

Generation settings (lm-eval's generation_kwargs; --gen-kwargs overrides them key by key):
`until` (stop strings, cut from the output as lm-eval's `split(term)[0]`; default: the task's
fewshot_delimiter "\\n\\n" for plain prompts, lm-eval's default, and none for chat prompts, which
end at the end of turn), `max_gen_toks` (256), greedy unless `do_sample` is true or
`temperature` > 0 (do_sample alone samples at temperature 1), `top_p`, `top_k`, `seed` (doc i
samples with seed + i, the same tokens whatever else is in the batch). eos always stops.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastserve.errors import ConfigError, DataError, FastServeError
from fastserve.eval.gen_metrics import DEFAULT_METRICS, MetricSpec, score_outputs
from fastserve.eval.tasks import (
    DEFAULT_FEWSHOT_SEED,
    GENERATE_UNTIL,
    GenDoc,
    Message,
    check_fewshot_pool,
    draw_fewshot,
    files_sha256,
    gen_doc,
)

__all__ = [
    "EngineGenerator",
    "GenBatch",
    "GenOptions",
    "GenOutput",
    "GenRequest",
    "GenTask",
    "Generation",
    "TokenizerPrompts",
    "check_gen_kwargs",
    "gen_jsonl_task",
    "parse_gen_kwargs",
    "prepare_generation",
    "resolve_generation",
    "run_gen_task",
]

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default max_gen_toks
DEFAULT_SEED = 1234
DEFAULT_BOOTSTRAP_ITERS = 1000
MAX_SEED = 2**63  # the engine's seeds live in [0, 2^63)


# ---- documents and tasks -------------------------------------------------------------------------


@dataclass
class GenTask:
    name: str
    source: str  # the file read
    sha256: str  # of the lines "<sha256>  <file name>\n" of the files read
    docs: list[GenDoc]
    generation_kwargs: dict[str, Any] = field(default_factory=dict)  # check_gen_kwargs'd
    metrics: tuple[MetricSpec, ...] = DEFAULT_METRICS
    fewshot_docs: list[GenDoc] | None = None  # None: examples are drawn from docs
    num_fewshot: int = 0
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    output_type: str = GENERATE_UNTIL

    def prompts(
        self, limit: int | None = None, chat: bool = False
    ) -> list[tuple[str | None, tuple[Message, ...] | None]]:
        """Per doc (prompt text, None) or, for a chat prompt, (None, messages); `chat`: plain
        prompts become a system message (the description) and one user message."""
        docs = self.docs if limit is None else self.docs[:limit]
        check_fewshot_pool(self.name, self.num_fewshot, self.docs, self.fewshot_docs)
        rng = random.Random(self.fewshot_seed)
        out = []
        for doc in docs:
            if doc.messages is not None:
                out.append((None, doc.messages))
                continue
            shots = ""
            if self.num_fewshot:
                examples = draw_fewshot(self.docs, self.fewshot_docs, self.num_fewshot, rng, doc)
                shots = "".join(
                    f"{ex.text}{self.target_delimiter}{ex.references[0]}{self.fewshot_delimiter}"
                    for ex in examples
                )
            if not chat:
                out.append((self.description + shots + doc.text, None))
                continue
            system = ({"role": "system", "content": self.description},) if self.description else ()
            out.append((None, (*system, {"role": "user", "content": shots + doc.text})))
        return out


def gen_jsonl_task(path, rows: list[dict]) -> GenTask:
    """A generative jsonl (rows already read): default generation settings and metrics."""
    docs = [gen_doc(row, f"{path}:{i}") for i, row in enumerate(rows, 1)]
    return GenTask(path.stem, str(path), files_sha256([path]), docs)


# ---- generation settings -------------------------------------------------------------------------


def check_gen_kwargs(value: Any, where: str, error: type[FastServeError] = ConfigError) -> dict:
    """generation_kwargs (a task's or --gen-kwargs) -> a checked dict with `until` a tuple;
    `error` (naming `where`) for an unknown key or a value of the wrong type."""
    if not isinstance(value, dict):
        raise error(f"{where}: generation settings must be a mapping of {', '.join(GEN_KWARGS)}.")
    unknown = sorted(set(value) - set(GEN_KWARGS))
    if unknown:
        raise error(
            f"{where}: unknown generation setting {unknown[0]!r} (known: {', '.join(GEN_KWARGS)})."
        )
    out = dict(value)
    if "until" in out:
        until = [out["until"]] if isinstance(out["until"], str) else out["until"]
        if not isinstance(until, list) or not all(isinstance(s, str) and s for s in until):
            raise error(f"{where}: until must be a stop string or a list of non-empty strings.")
        out["until"] = tuple(until)
    kinds = {"max_gen_toks": int, "top_k": int, "seed": int, "temperature": float, "top_p": float}
    for key, kind in kinds.items():
        v = out.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int if kind is int else int | float):
            what = "an integer" if kind is int else "a number"
            raise error(f"{where}: {key} must be {what}, got {v!r:.40}.")
    if "max_gen_toks" in out and out["max_gen_toks"] < 1:
        raise error(f"{where}: max_gen_toks must be at least 1, got {out['max_gen_toks']}.")
    if "do_sample" in out and not isinstance(out["do_sample"], bool):
        raise error(f"{where}: do_sample must be true or false, got {out['do_sample']!r:.40}.")
    return out


def _arg_value(key: str, raw: str) -> Any:
    """lm-eval's --gen_kwargs value rules (true/false, int, float, else the string); `until`
    is one stop string with JSON escapes (until=\\n\\n is two newlines)."""
    if key == "until":
        try:
            return json.loads(f'"{raw}"')
        except json.JSONDecodeError:
            return raw
    if raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def parse_gen_kwargs(spec: str | dict | None) -> dict:
    """--gen-kwargs: "key=value,key=value" (lm-eval's form) or a JSON object (for several stop
    strings: '{"until": ["\\n", "."]}'), or a dict; ConfigError for an unknown key."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {}
    if isinstance(spec, dict):
        return check_gen_kwargs(spec, "--gen-kwargs")
    text = spec.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--gen-kwargs is not a valid JSON object ({e.msg}).") from None
        return check_gen_kwargs(value, "--gen-kwargs")
    out = {}
    for part in text.split(","):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--gen-kwargs takes key=value pairs separated by commas, got {part!r:.40}."
            )
        out[key.strip()] = _arg_value(key.strip(), raw)
    return check_gen_kwargs(out, "--gen-kwargs")


@dataclass(frozen=True)
class Generation:
    """A task's resolved generation settings."""

    until: tuple[str, ...] | None  # stop strings; None: the default of the prompt's kind
    max_gen_toks: int  # before clipping to the context
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: off
    seed: int  # doc i samples with seed + i (unused when greedy)

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def sampling_params(self, max_tokens: int, stop: Sequence[str], seed: int | None):
        from fastserve.engine.request import SamplingParams

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=seed if self.do_sample else None,
            stop=list(stop),
        )


def resolve_generation(task_kwargs: dict, overrides: dict, where: str) -> Generation:
    """The task's generation_kwargs updated by --gen-kwargs -> Generation; ConfigError for a
    contradiction (do_sample=false with temperature > 0) or a value the engine refuses."""
    kw = {**task_kwargs, **overrides}
    do_sample, temperature = kw.get("do_sample"), kw.get("temperature")
    if do_sample is False and temperature:
        raise ConfigError(
            f"{where}: do_sample=false contradicts temperature={temperature}; add do_sample=true "
            "to sample (--gen-kwargs do_sample=true,temperature=...)."
        )
    if temperature is None:
        temperature = 1.0 if do_sample else 0.0
    if do_sample and temperature == 0:
        raise ConfigError(f"{where}: do_sample=true needs a temperature > 0.")
    gen = Generation(
        until=kw.get("until"),
        max_gen_toks=kw.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS),
        temperature=float(temperature),
        top_p=float(kw.get("top_p", 1.0)),
        top_k=kw.get("top_k", 0),
        seed=kw.get("seed", DEFAULT_SEED),
    )
    try:  # the engine's own bounds (temperature >= 0, 0 < top_p <= 1, seeds, stop strings)
        gen.sampling_params(1, gen.until or (), gen.seed)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}.") from None
    return gen


@dataclass(frozen=True)
class GenOptions:
    """The run's settings for every generative task (evaluate()'s arguments)."""

    gen_kwargs: dict = field(default_factory=dict)  # --gen-kwargs: overrides of each task's
    apply_chat_template: bool = False  # plain prompts through the chat template
    log_samples: bool = False  # per-doc records in the task's entry
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS  # bleu / chrf stderr resamples (< 2: none)

    @classmethod
    def parse(
        cls,
        gen_kwargs: str | dict | None = None,
        apply_chat_template: bool = False,
        log_samples: bool = False,
        bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    ) -> GenOptions:
        if not isinstance(bootstrap_iters, int) or bootstrap_iters < 0:
            raise ConfigError(f"bootstrap_iters must be an integer >= 0, got {bootstrap_iters!r}.")
        return cls(parse_gen_kwargs(gen_kwargs), apply_chat_template, log_samples, bootstrap_iters)

    def settings(self, tasks: list) -> dict[str, Any]:
        """The results' settings entry {"generation": ...} when some task is generative, else
        nothing (the settings of runs without generative tasks stay as they were)."""
        if not any(isinstance(t, GenTask) for t in tasks):
            return {}
        kw = {k: list(v) if isinstance(v, tuple) else v for k, v in self.gen_kwargs.items()}
        return {
            "generation": {
                "gen_kwargs": kw or None,
                "apply_chat_template": self.apply_chat_template,
                "log_samples": self.log_samples,
                "bootstrap_iters": self.bootstrap_iters,
            }
        }


# ---- requests ------------------------------------------------------------------------------------


class PromptTokenizer(Protocol):
    """What prepare_generation needs of a tokenizer (a local one, or a server's /tokenize)."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of plain prompts, without special tokens."""
        ...

    def chat_prompt(self, messages: list[Message]) -> tuple[str | None, list[int]]:
        """The chat template's text (None when not known here) and its token ids."""
        ...


class TokenizerPrompts:
    """A local Tokenizer as a PromptTokenizer: the chat template rendered with the generation
    prompt and encoded as `fastserve serve` encodes it (special-token text is those tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts)

    def chat_prompt(self, messages: list[Message]) -> tuple[str | None, list[int]]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except FastServeError:
            raise
        except Exception as e:  # jinja2's errors in a user's template
            raise DataError(f"cannot apply the chat template ({e}).") from None
        return text, self.tokenizer.encode_batch([text])[0]


@dataclass(frozen=True)
class GenRequest:
    """One doc's generation: what the engine (or a server) is asked."""

    token_ids: tuple[int, ...]  # the prompt's tokens (a chat prompt's: the template's)
    text: str | None  # the prompt as text (None: a chat prompt rendered by the server)
    messages: tuple[Message, ...] | None  # a chat prompt's messages; None: a plain prompt
    params: Any  # engine SamplingParams: stop, max_tokens (clipped), temperature, top_p, seed
    clipped: bool  # max_tokens was cut below max_gen_toks to fit the context


@dataclass
class GenBatch:
    """A task's requests, first docs first, and the settings they were made with."""

    requests: list[GenRequest]
    generation: Generation
    plain_stop: tuple[str, ...]  # the stop strings of plain prompts
    chat_stop: tuple[str, ...]  # of chat prompts
    chat_template: bool  # plain prompts went through the chat template


def prepare_generation(
    task: GenTask,
    prompts: PromptTokenizer,
    max_len: int,
    options: GenOptions,
    limit: int | None = None,
) -> GenBatch:
    """The requests of the first `limit` docs; DataError naming the doc for a prompt that does
    not leave room for one generated token in max_len, ConfigError for bad settings."""
    gen = resolve_generation(task.generation_kwargs, options.gen_kwargs, f"task {task.name}")
    default_plain = (task.fewshot_delimiter,) if task.fewshot_delimiter else ()
    plain_stop = gen.until if gen.until is not None else default_plain
    chat_stop = gen.until if gen.until is not None else ()
    items = task.prompts(limit, options.apply_chat_template)
    texts = [text for text, messages in items if messages is None]
    encoded = iter(prompts.encode_batch(texts) if texts else [])
    requests = []
    for i, (text, messages) in enumerate(items):
        where = f"task {task.name}, doc {i + 1}"
        if messages is None:
            ids = next(encoded)
        else:
            try:
                text, ids = prompts.chat_prompt([dict(m) for m in messages])
            except FastServeError as e:
                raise DataError(f"{where}: {e}") from None
        if not ids:
            raise DataError(f"{where}: the prompt encodes to no tokens.")
        room = max_len - len(ids)
        if room < 1:
            raise DataError(
                f"{where}: the prompt has {len(ids)} tokens and leaves no room in the model's "
                f"context ({max_len} tokens); shorten it or use fewer shots."
            )
        max_tokens = min(gen.max_gen_toks, room)
        stop = plain_stop if messages is None else chat_stop
        params = gen.sampling_params(max_tokens, stop, (gen.seed + i) % MAX_SEED)
        clipped = max_tokens < gen.max_gen_toks
        requests.append(GenRequest(tuple(ids), text, messages, params, clipped))
    return GenBatch(requests, gen, plain_stop, chat_stop, options.apply_chat_template)


# ---- generation through the engine ---------------------------------------------------------------


@dataclass(frozen=True)
class GenOutput:
    text: str  # the generated text, stop string cut, special tokens skipped
    num_tokens: int  # generated tokens (a stop string's tokens included)
    finish_reason: str  # "stop" (eos or a stop string) or "length"


class Generator(Protocol):
    def generate(
        self, requests: list[GenRequest], on_done: Callable[[], None] | None = None
    ) -> list[GenOutput]:
        """Outputs in the order of `requests`; `on_done()` once per finished request."""
        ...


class EngineGenerator:
    """Generates through an LLMEngine (its own: adds every request, steps until all finish)."""

    def __init__(self, engine, max_in_flight: int | None = None) -> None:
        self.engine = engine
        self.max_in_flight = max_in_flight or 2 * engine.config.max_num_seqs

    def generate(self, requests, on_done=None):
        from fastserve.eval.engine_runs import finished_outputs

        outputs: list[GenOutput | None] = [None] * len(requests)
        items = ((i, req.token_ids, req.params) for i, req in enumerate(requests))
        error = lambda i, exc: DataError(f"cannot generate for doc {i + 1}: {exc}")  # noqa: E731
        runs = finished_outputs(self.engine, items, self.max_in_flight, error, prefix="gen")
        with contextlib.closing(runs):
            for i, out in runs:
                outputs[i] = self._output(out)
                if on_done is not None:
                    on_done()
        return outputs

    @staticmethod
    def _output(out) -> GenOutput:
        o = out.outputs[0]
        if o.finish_reason == "error":
            raise FastServeError(f"the engine failed to generate: {o.stop_reason}")
        return GenOutput(o.text, len(o.token_ids), str(o.finish_reason))


# ---- the task's entry ----------------------------------------------------------------------------


def _samples(task: GenTask, batch: GenBatch, outputs, per_doc) -> list[dict[str, Any]]:
    return [
        {
            "doc": i,
            "id": doc.doc_id,
            "prompt": req.text,
            "messages": None if req.messages is None else [dict(m) for m in req.messages],
            "references": list(doc.references),
            "output": out.text,
            "num_prompt_tokens": len(req.token_ids),
            "num_tokens": out.num_tokens,
            "finish_reason": out.finish_reason,
            "scores": scores,
        }
        for i, (doc, req, out, scores) in enumerate(
            zip(task.docs, batch.requests, outputs, per_doc)
        )
    ]


def gen_task_entry(
    task: GenTask, batch: GenBatch, outputs: list[GenOutput], options: GenOptions, time_s: float
) -> dict[str, Any]:
    """One generative task's entry of the results JSON (docs/formats.md, "tasks")."""
    reqs, gen = batch.requests, batch.generation
    references = [d.references for d in task.docs[: len(reqs)]]
    texts = [o.text for o in outputs]
    metrics, per_doc = score_outputs(
        texts, references, task.metrics, options.bootstrap_iters, per_doc=options.log_samples
    )
    num_generated = sum(o.num_tokens for o in outputs)
    reasons = [o.finish_reason for o in outputs]
    return {
        "name": task.name,
        "output_type": GENERATE_UNTIL,
        "source": task.source,
        "sha256": task.sha256,
        "num_docs": len(reqs),
        "num_docs_total": len(task.docs),
        "truncated": len(reqs) < len(task.docs),
        "num_fewshot": task.num_fewshot,
        "fewshot_seed": task.fewshot_seed if task.num_fewshot else None,
        "num_requests": len(reqs),
        "num_chat_prompts": sum(r.messages is not None for r in reqs),
        "num_prompt_tokens": sum(len(r.token_ids) for r in reqs),
        "num_generated_tokens": num_generated,
        "num_clipped_requests": sum(r.clipped for r in reqs),
        "finish_reasons": dict(sorted(collections.Counter(reasons).items())),
        "generation": {
            "until": list(batch.plain_stop),
            "chat_until": list(batch.chat_stop),
            "max_gen_toks": gen.max_gen_toks,
            "do_sample": gen.do_sample,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "top_k": gen.top_k,
            "seed": gen.seed if gen.do_sample else None,
            "apply_chat_template": batch.chat_template,
        },
        "metric_list": [s.describe() for s in task.metrics],
        "bootstrap_iters": options.bootstrap_iters,
        "metrics": metrics,
        "time_s": time_s,
        "docs_per_s": len(reqs) / max(time_s, 1e-9),
        "generated_tokens_per_s": num_generated / max(time_s, 1e-9),
        "samples": _samples(task, batch, outputs, per_doc) if per_doc is not None else None,
    }


def run_gen_task(
    task: GenTask, batch: GenBatch, generator: Generator, options: GenOptions, progress=None
) -> dict[str, Any]:
    """Generate for the prepared requests and return the task's results entry; `progress`: a
    rich Progress (a bar per task)."""
    bar = progress.add_task(task.name, total=len(batch.requests)) if progress is not None else None
    on_done = (lambda: progress.update(bar, advance=1)) if bar is not None else None
    start = time.perf_counter()
    outputs = generator.generate(batch.requests, on_done)
    return gen_task_entry(task, batch, outputs, options, time.perf_counter() - start)
