"""Log-likelihood scoring of tasks (tasks.py) with lm-evaluation-harness's conventions, through
the serving engine: requests, the engine scorer, metrics.

    docs = encode_requests(task.requests(limit), tokenizer.encode_batch, prefix_id, max_len)
    results = EngineScorer(engine).score(docs)           # per doc, per continuation
    entry = task_entry(task, docs, results, time_s)      # the task's entry of the results JSON

Tokenization is lm-eval's for HF models (`TemplateLM._encode_pair`, add_special_tokens=False, so
no BOS unless the text itself holds one): trailing whitespace of the context moves to the
continuation; context and context + continuation are encoded; the continuation's tokens are the
second encoding past the length of the first. An empty context is the prefix token (bos, else
eos, lm-eval's `prefix_token_id`). A request longer than the model's context is cut from the left
to max_len tokens (lm-eval keeps max_len + 1, since it never feeds the last token).

A doc's requests share their context: each is one engine request with prompt_logprobs from the
first continuation token on (`prompt_logprobs_start`), so the context's full KV blocks come from
the prefix cache after the first choice computed them (the doc's choices are added together).
The log-likelihood of a continuation is the sum of its tokens' prompt logprobs; it is greedy when
every token's logprob is the largest of its position (lm-eval compares the argmax token).

Metrics (lm-eval's): acc (argmax of the log-likelihoods is the gold), acc_norm (argmax of the
log-likelihood divided by the choice's length in characters, `len(choice)`, which is its byte
length for ASCII), each with stderr = the sample standard deviation over docs / sqrt(n); cloze
tasks: acc = the target is greedy, perplexity = exp(-mean log-likelihood of the target) with a
first-order stderr (lm-eval bootstraps it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fastserve.errors import DataError, FastServeError
from fastserve.eval.stats import stderr
from fastserve.eval.tasks import MULTIPLE_CHOICE, Task

__all__ = [
    "EngineScorer",
    "LoglikelihoodRequest",
    "LoglikelihoodResult",
    "Scorer",
    "encode_requests",
    "greedy_result",
    "prefix_token_id",
    "run_task",
    "split_pair",
    "task_entry",
    "task_metrics",
]

EncodeBatch = Callable[[list[str]], list[list[int]]]


@dataclass(frozen=True)
class LoglikelihoodRequest:
    token_ids: tuple[int, ...]  # context + continuation tokens, cut to the model's context
    start: int  # index of the first continuation token in token_ids (>= 1)
    truncated: bool = False  # True when the context was cut from the left to fit

    @property
    def num_continuation(self) -> int:
        return len(self.token_ids) - self.start


@dataclass(frozen=True)
class LoglikelihoodResult:
    logprob: float  # sum of the continuation tokens' log-probabilities (nats)
    is_greedy: bool  # every continuation token was the most likely next token


class Scorer(Protocol):
    def score(
        self, docs: list[list[LoglikelihoodRequest]], on_doc: Callable[[], None] | None = None
    ) -> list[list[LoglikelihoodResult]]:
        """Results in the shape of `docs`; `on_doc()` once per finished doc."""
        ...


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's first step: trailing whitespace of the context moves to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_requests(
    pairs: Sequence[tuple[str, list[str]]],
    encode_batch: EncodeBatch,
    prefix_id: int | None,
    max_len: int,
    task_name: str = "task",
) -> list[list[LoglikelihoodRequest]]:
    """Per doc (context, continuations) -> its requests; see the module docstring. `prefix_id`
    None: no prefix token is known (an empty context is then an error)."""
    split = [
        [("", cont) if not context else split_pair(context, cont) for cont in conts]
        for context, conts in pairs
    ]
    texts = sorted({t for doc in split for ctx, cont in doc for t in (ctx, ctx + cont)})
    ids = dict(zip(texts, encode_batch(texts)))
    docs = []
    for num, doc in enumerate(split, 1):
        reqs = []
        for ctx, cont in doc:
            ctx_ids = ids[ctx] if ctx else []
            cont_ids = ids[ctx + cont][len(ctx_ids) :] if ctx else ids[cont]
            if not ctx_ids:
                if prefix_id is None:
                    raise DataError(
                        f"task {task_name}, doc {num} has an empty context and no prefix token is "
                        "known; pass --tokenizer DIR."
                    )
                ctx_ids = [prefix_id]
            if len(cont_ids) >= max_len:
                raise DataError(
                    f"task {task_name}, doc {num}: a continuation of {len(cont_ids)} tokens does "
                    f"not fit the model's context ({max_len} tokens)."
                )
            tokens = [*ctx_ids, *cont_ids]
            cut = max(0, len(tokens) - max_len)
            reqs.append(LoglikelihoodRequest(tuple(tokens[cut:]), len(ctx_ids) - cut, cut > 0))
        docs.append(reqs)
    return docs


def greedy_result(chosen: Sequence[float], best: Sequence[float]) -> LoglikelihoodResult:
    """From each continuation token's logprob and the best logprob at its position."""
    return LoglikelihoodResult(
        logprob=float(math.fsum(chosen)), is_greedy=all(c >= b for c, b in zip(chosen, best))
    )


class EngineScorer:
    """Scores requests through an LLMEngine (its own: the scorer adds and steps requests)."""

    def __init__(self, engine, max_in_flight: int | None = None) -> None:
        self.engine = engine
        self.max_in_flight = max_in_flight or 2 * engine.config.max_num_seqs

    def score(self, docs, on_doc=None):
        from fastserve.engine.request import SamplingParams
        from fastserve.eval.engine_runs import finished_outputs

        results: list[list[LoglikelihoodResult | None]] = [[None] * len(d) for d in docs]
        left = [len(d) for d in docs]

        def requests():
            for d, doc in enumerate(docs):
                for j, req in enumerate(doc):
                    if req.num_continuation == 0:  # lm-eval: an empty continuation scores 0
                        results[d][j] = LoglikelihoodResult(0.0, True)
                        left[d] -= 1
                        continue
                    params = SamplingParams(
                        max_tokens=1,
                        temperature=0.0,
                        prompt_logprobs=1,
                        prompt_logprobs_start=req.start,
                    )
                    yield (d, j), req.token_ids, params
                if left[d] == 0 and on_doc is not None:
                    on_doc()

        error = lambda key, exc: DataError(f"cannot score a request: {exc}")  # noqa: E731
        runs = finished_outputs(self.engine, requests(), self.max_in_flight, error, prefix="ll")
        with contextlib.closing(runs):
            for (d, j), out in runs:
                results[d][j] = self._result(out, docs[d][j])
                left[d] -= 1
                if left[d] == 0 and on_doc is not None:
                    on_doc()
        return results

    @staticmethod
    def _result(out, req: LoglikelihoodRequest) -> LoglikelihoodResult:
        o = out.outputs[0]
        if o.finish_reason == "error":
            raise FastServeError(f"the engine failed to score a request: {o.stop_reason}")
        chosen, best = [], []
        for pos in range(req.start, len(req.token_ids)):
            entry = out.prompt_logprobs[pos]
            chosen.append(entry[req.token_ids[pos]].logprob)
            best.append(max(lp.logprob for lp in entry.values()))
        return greedy_result(chosen, best)


# ---- metrics -------------------------------------------------------------------------------------


def _mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), stderr(x)


def task_metrics(task: Task, results: list[list[LoglikelihoodResult]]) -> dict[str, Any]:
    """lm-eval's metrics over the first len(results) docs of `task` (module docstring)."""
    docs = task.docs[: len(results)]
    if task.output_type == MULTIPLE_CHOICE:
        acc, acc_norm = [], []
        for doc, res in zip(docs, results):
            lls = np.array([r.logprob for r in res])
            lengths = np.array([float(max(1, len(c))) for c in doc.choices])
            acc.append(float(np.argmax(lls) == doc.gold))
            acc_norm.append(float(np.argmax(lls / lengths) == doc.gold))
        (a, a_se), (n, n_se) = _mean_and_stderr(acc), _mean_and_stderr(acc_norm)
        return {"acc": a, "acc_stderr": a_se, "acc_norm": n, "acc_norm_stderr": n_se}
    lls = [res[0].logprob for res in results]
    a, a_se = _mean_and_stderr([float(res[0].is_greedy) for res in results])
    mean_ll, ll_se = _mean_and_stderr(lls)
    ppl = math.exp(-mean_ll)
    return {
        "acc": a,
        "acc_stderr": a_se,
        "perplexity": ppl,
        "perplexity_stderr": None if ll_se is None else ppl * ll_se,
    }


def task_entry(
    task: Task,
    docs: list[list[LoglikelihoodRequest]],
    results: list[list[LoglikelihoodResult]],
    time_s: float,
) -> dict[str, Any]:
    """One task's entry of the results JSON (docs/formats.md, "tasks")."""
    reqs = [r for d in docs for r in d]
    return {
        "name": task.name,
        "output_type": task.output_type,
        "source": task.source,
        "sha256": task.sha256,
        "num_docs": len(docs),
        "num_docs_total": len(task.docs),
        "truncated": len(docs) < len(task.docs),
        "num_fewshot": task.num_fewshot,
        "fewshot_seed": task.fewshot_seed if task.num_fewshot else None,
        "num_requests": len(reqs),
        "num_prompt_tokens": sum(len(r.token_ids) for r in reqs),
        "num_continuation_tokens": sum(r.num_continuation for r in reqs),
        "num_cut_requests": sum(r.truncated for r in reqs),
        "metrics": task_metrics(task, results),
        "time_s": time_s,
        "docs_per_s": len(docs) / max(time_s, 1e-9),
    }


def prefix_token_id(tokenizer) -> int | None:
    """lm-eval's prefix for an empty context: bos, else eos (None without a tokenizer)."""
    if tokenizer is None:
        return None
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def run_task(
    task: Task, scorer: Scorer, docs: list[list[LoglikelihoodRequest]], progress=None
) -> dict[str, Any]:
    """Score the encoded docs of `task` (encode_requests) and return its results entry;
    `progress`: a rich Progress (a bar per task)."""
    import time

    bar = progress.add_task(task.name, total=len(docs)) if progress is not None else None
    on_doc = (lambda: progress.update(bar, advance=1)) if bar is not None else None
    start = time.perf_counter()
    results = scorer.score(docs, on_doc)
    return task_entry(task, docs, results, time.perf_counter() - start)
