"""`LLMEngine`: wires scheduler, KV-cache manager, model runner and sampler; owns request state.

    engine = LLMEngine.from_model_dir("runs/small/model", EngineConfig(policy="mlfq"))
    engine.add_request("r1", "def main(", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():          # RequestOutputs of requests that advanced this step
            print(out.request_id, out.outputs[0].text, out.finished)

One step = schedule -> run -> postprocess (nano-vllm, vLLM v1):
  1. `Scheduler.schedule()` picks the requests and how many tokens each computes (prefill chunks
     and decodes share the token budget), plus the KV swaps to do first.
  2. `ModelRunner.execute()` copies swapped blocks, runs the model with paged attention and returns
     the logits of the requests whose scheduled tokens reach their end (they sample).
  3. The sampler picks tokens; the engine appends them, detokenizes, applies stop conditions and
     tells the scheduler which requests finished (their KV is freed at once).
A request with n > 1 is fanned out into n child requests (ids `rid#i`, seeds seed + i) that share
their prompt's KV through the prefix cache; the caller sees one RequestOutput with n outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from fastserve.engine.config import EngineConfig, parse_bytes
from fastserve.engine.detokenizer import IncrementalDetokenizer
from fastserve.engine.kv_cache import KVCacheManager
from fastserve.engine.request import (
    MAX_INT,
    CompletionOutput,
    Logprob,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    check_prompt,
    check_stop,
)
from fastserve.engine.runner import ModelRunner, RunnerBatch, RunnerRequest
from fastserve.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    logprob_dict,
    token_logprobs,
)
from fastserve.engine.scheduler import CostModel, ScheduledRequest, Scheduler, SchedulerOutput

logger = logging.getLogger("fastserve.engine")


class EngineDeadError(RuntimeError):
    """A step failed and no request explains it (the model or the engine itself is broken)."""


@dataclass
class _StepResult:
    """What the compute phase of a step produced, before any request state changes."""

    sample_ids: list[str]  # requests that sample this step, in the sampler's row order
    sampled: SamplerOutput | None  # their tokens (and logprobs); None when nobody samples
    prompt_rows: dict[str, list]  # request -> prompt logprob rows computed this step


@dataclass
class _Group:
    """The user's request: one prompt, n child sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    texts: list[str]  # emitted text per child (held-back text excluded until it is safe)
    logprobs: list[list[dict[int, Logprob]] | None]
    cumulative_logprob: list[float | None]
    # [None] + one dict per prompt token computed so far (prompt_logprobs only)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)

    def children_by_id(self, request_id: str) -> Request:
        return next(c for c in self.children if c.request_id == request_id)


@dataclass
class EngineStats:
    """Gauges and counters for /metrics and benchmarks."""

    num_running: int  # requests holding device KV
    num_waiting: int  # queued, never started or preempted (recompute)
    num_swapped: int  # KV in the host tier
    kv_usage: float  # fraction of device KV blocks in use
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which were found
    num_prompt_tokens: int  # computed prompt tokens, all requests so far
    num_generation_tokens: int  # sampled tokens, all requests so far
    num_preemptions: int
    num_swap_outs: int  # requests moved to the host tier (preemption or proactive), so far
    num_swap_ins: int  # requests brought back to the device, so far
    finished_by_reason: dict[str, int] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        mc = model.config
        self.max_model_len = min(
            config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        bs = config.block_size
        num_blocks = config.num_kv_blocks or ModelRunner.num_blocks_for_memory(
            mc, bs, parse_bytes(config.kv_cache_memory), model.dtype
        )
        if config.num_host_blocks is not None:
            num_host = config.num_host_blocks
        else:
            swap_bytes = parse_bytes(config.swap_space)
            num_host = ModelRunner.num_blocks_for_memory(mc, bs, swap_bytes, model.dtype)
        self.runner = ModelRunner(
            model,
            num_blocks,
            bs,
            num_host,
            device=config.device,
            fused_attention=config.fused_attention,
        )
        estimate = self.runner.profile()
        self.cost = CostModel(estimate.prefill_s_per_token, estimate.decode_s_per_step)
        self.kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching, num_host)
        sched_config = config.scheduler_config(self.max_model_len, swap=num_host > 0)
        self.scheduler = Scheduler(sched_config, self.kv, self.cost)
        self.sampler = Sampler(seed=config.seed, device=self.runner.device)
        self._groups: dict[str, _Group] = {}
        self._child_group: dict[str, _Group] = {}
        self._counters = dict(prompt=0, generation=0)
        self._token_texts: dict[int, str] = {}  # token id -> its text (logprob entries)
        self._finished_by_reason: dict[str, int] = {}

    @classmethod
    def from_model_dir(cls, path: str, config: EngineConfig | None = None) -> LLMEngine:
        from fastserve.data.tokenizer import Tokenizer
        from fastserve.model import load_model

        config = config or EngineConfig()
        model = load_model(path, device=config.device, dtype=config.dtype)
        return cls(model, Tokenizer.load(path), config)

    # ---- requests in -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. ValueError (naming the problem) if it can never be served; the
        engine is unaffected."""
        params = params or SamplingParams()
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        ids = check_prompt(ids, self.model.config.vocab_size, self.max_model_len)
        params.verify(self.model.config.vocab_size)
        if not isinstance(priority, int) or not -MAX_INT - 1 <= priority <= MAX_INT:
            raise ValueError(f"priority must be an integer in [-2^63, 2^63), got {priority!r}")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        eos = self.tokenizer.eos_token_id
        children = [
            Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=ids,
                sampling_params=params.for_child(i),
                eos_token_id=eos,
                arrival_time=arrival,
                priority=priority,
                prompt=text,
                parent_id=request_id,
                index=i,
            )
            for i in range(params.n)
        ]
        group = _Group(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            children=children,
            detokenizers=[IncrementalDetokenizer.from_request(self.tokenizer, c) for c in children],
            texts=[""] * params.n,
            logprobs=[[] if params.logprobs is not None else None for _ in children],
            cumulative_logprob=[0.0 if params.logprobs is not None else None for _ in children],
            # entries before prompt_logprobs_start stay None (entry 0 always: nothing predicts it)
            prompt_logprobs=(
                [None] * min(max(1, params.prompt_logprobs_start), len(ids))
                if params.prompt_logprobs is not None
                else None
            ),
        )
        for child in children:
            reason = self.scheduler.add_request(child)
            if reason is not None:
                for c in children:
                    self.scheduler.abort(c.request_id)
                raise ValueError(reason)
        self._groups[request_id] = group
        for child in children:
            self._child_group[child.request_id] = group

    def abort_request(self, request_id: str, count: bool = True) -> None:
        """Abort a request (all its n sequences); its KV blocks are free when this returns.
        `count=False`: a request taken back before it ran (not counted as aborted)."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for child in group.children:
            finished = child.is_finished  # before the abort: stopped children count as such
            self.scheduler.abort(child.request_id)
            self._child_group.pop(child.request_id, None)
            if count:  # per sequence, as _release counts
                self._count_finished(child.finish_reason if finished else "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    # ---- one step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the RequestOutputs (cumulative) of requests that advanced.

        A request whose tokens cannot be computed or sampled finishes alone with an error (see
        `_isolate`); only a failure no request explains raises `EngineDeadError`."""
        sched = self.scheduler.schedule()
        touched: dict[str, _Group] = {}
        for rid, reason in sched.finished.items():  # finished by the scheduler itself
            group = self._child_group.get(rid)
            if group is not None:
                child = group.children_by_id(rid)
                child.error = child.error or reason
                touched[group.request_id] = group
        if sched.scheduled or sched.swap_in or sched.swap_out:
            self._run(sched, touched)
        outputs = [self._output(g) for g in touched.values()]
        for group in touched.values():
            if group.finished:
                self._release(group)
        return outputs

    def _run(self, sched: SchedulerOutput, touched: dict[str, _Group]) -> None:
        # Two phases: compute (model, sampler, prompt logprobs: no request state changes, so a
        # failure can be retried without the requests that cause it) and commit.
        self.runner.swap(sched.swap_out, sched.swap_in)
        rngs = self._rng_states(sched.scheduled)
        try:
            result = self._compute(sched.scheduled, sched.block_tables)
        except Exception as exc:
            result = self._isolate(sched, exc, rngs, touched)
        scheduled_at = time.monotonic()
        for s in sched.scheduled:
            r = self._child_group[s.request_id].children_by_id(s.request_id)
            if r.metrics.first_scheduled_time is None:  # queue time ends here
                r.metrics.first_scheduled_time = scheduled_at
            if r.num_computed_tokens < r.num_prompt_tokens:
                self._counters["prompt"] += min(
                    s.num_new_tokens, r.num_prompt_tokens - r.num_computed_tokens
                )
        for rid, rows in result.prompt_rows.items():
            self._isolated(rid, touched, self._append_prompt_logprobs, rid, rows)
        self.scheduler.update_after_step(sched)
        now = time.monotonic()
        for i, rid in enumerate(result.sample_ids):
            if rid in self.scheduler.requests:  # not failed while committing its prompt rows
                touched[self._child_group[rid].request_id] = self._child_group[rid]
                self._isolated(rid, touched, self._append_token, rid, result.sampled, i, now)

    def _compute(self, scheduled: list[ScheduledRequest], block_tables) -> _StepResult:
        """Run the model over `scheduled` and sample; reads request state, changes none (the KV
        written for the scheduled tokens is the same whoever runs them)."""
        requests = [self._child_group[s.request_id].children_by_id(s.request_id) for s in scheduled]
        batch = RunnerBatch([])
        for s, r in zip(scheduled, requests):
            first, end = self._prompt_logit_span(r, s.num_new_tokens)
            batch.requests.append(
                RunnerRequest(
                    request_id=r.request_id,
                    token_ids=r.all_token_ids,
                    num_computed_tokens=r.num_computed_tokens,
                    num_new_tokens=s.num_new_tokens,
                    block_table=block_tables[r.request_id],
                    wants_logits=s.is_prefill_chunk_final,
                    wants_prompt_logits=first < end,
                    prompt_logits_from=first,
                )
            )
        out = self.runner.execute(batch)
        prompt_rows = {}
        for req in batch.requests:
            if req.request_id in out.prompt_logits:
                rows = self._prompt_logprob_rows(req, out.prompt_logits[req.request_id])
                if rows:
                    prompt_rows[req.request_id] = rows
        sampled = None
        if out.sample_request_ids:
            rids = out.sample_request_ids
            samplers = [self._child_group[rid].children_by_id(rid) for rid in rids]
            sampled = self.sampler(out.sample_logits, SamplingBatch.from_requests(samplers))
        return _StepResult(out.sample_request_ids, sampled, prompt_rows)

    def _isolate(
        self, sched: SchedulerOutput, exc: Exception, rngs: dict, touched: dict[str, _Group]
    ) -> _StepResult:
        """The step failed: run each scheduled request alone to find the ones that fail by
        themselves, finish those with an error (their KV is freed), and rerun the rest as one
        batch. Raises EngineDeadError when no request reproduces the failure, or when every
        request fails and the model fails a one-token forward of its own (the model is broken);
        a failure of the rerun propagates too."""
        logger.warning("engine step failed (%s: %s); isolating the cause", type(exc).__name__, exc)
        failed: dict[str, Exception] = {}
        for s in sched.scheduled:
            self._restore_rng_states(rngs)
            try:
                self._compute([s], sched.block_tables)
            except Exception as alone:
                failed[s.request_id] = alone
        if not failed or (len(failed) == len(sched.scheduled) and not self._model_works()):
            raise EngineDeadError(f"engine step failed: {type(exc).__name__}: {exc}") from exc
        for rid, alone in failed.items():
            logger.warning("request %s failed alone and is finished with an error: %r", rid, alone)
            self._fail(rid, f"{type(alone).__name__}: {alone}", touched)
        sched.scheduled = [s for s in sched.scheduled if s.request_id not in failed]
        self._restore_rng_states(rngs)
        if not sched.scheduled:
            return _StepResult([], None, {})
        return self._compute(sched.scheduled, sched.block_tables)

    def _isolated(self, rid: str, touched: dict[str, _Group], fn, *args) -> None:
        """Commit one request's results; an exception finishes that request alone."""
        try:
            fn(*args)
        except Exception as exc:
            logger.warning("request %s failed and is finished with an error: %r", rid, exc)
            self._fail(rid, f"{type(exc).__name__}: {exc}", touched)

    def _fail(self, rid: str, message: str, touched: dict[str, _Group]) -> None:
        group = self._child_group[rid]
        child = group.children_by_id(rid)
        child.error = message
        self.scheduler.finish(rid, RequestStatus.FINISHED_ERROR)  # frees its KV blocks
        touched[group.request_id] = group

    def _model_works(self) -> bool:
        try:
            ids = torch.zeros(1, 1, dtype=torch.long, device=self.runner.device)
            return bool(torch.isfinite(self.model(ids)).all())
        except Exception:
            return False

    def _rng_states(self, scheduled: list[ScheduledRequest]) -> dict:
        """Generator states before a step, so a retried step samples what it would have."""
        states = {None: self.sampler.generator.get_state()}
        for s in scheduled:
            r = self._child_group[s.request_id].children_by_id(s.request_id)
            if r.generator is not None and not r.sampling_params.is_greedy:
                states[s.request_id] = (r.generator, r.generator.get_state())
        return states

    def _restore_rng_states(self, states: dict) -> None:
        self.sampler.generator.set_state(states[None])
        for key, value in states.items():
            if key is not None:
                generator, state = value
                generator.set_state(state)

    def _append_token(self, rid: str, sampled: SamplerOutput, i: int, now: float) -> None:
        group = self._child_group[rid]
        r = group.children_by_id(rid)
        token = sampled.token_ids[i]
        r.append_output_token(token, now)
        self._counters["generation"] += 1
        if sampled.logprobs is not None and sampled.logprobs[i] is not None:
            row = sampled.logprobs[i]
            group.logprobs[r.index].append(logprob_dict(row, self._decode_one))
            group.cumulative_logprob[r.index] += row[0][1]
        stopped = check_stop(r, self.max_model_len, now)
        detok = group.detokenizers[r.index]
        delta = detok.add([token], final=stopped)
        if not stopped and detok.stop_hit is not None:
            r.finish(RequestStatus.FINISHED_STOPPED, detok.stop_hit, now)
            delta += detok.flush()
            stopped = True
        group.texts[r.index] += delta
        if stopped:
            self.scheduler.finish(r.request_id, r.status)

    def _prompt_logit_span(self, r: Request, num_new_tokens: int) -> tuple[int, int]:
        """Positions [first, end) of this step whose logits give prompt logprobs not known yet
        (position p predicts prompt token p + 1); none when first >= end. The entries known are
        0..have-1 (None before prompt_logprobs_start), and the prefix cache never skips
        position have - 1 (kv_cache.get_computed_blocks), so first == have - 1 when it computes."""
        if r.sampling_params.prompt_logprobs is None or r.index != 0:
            return 0, 0
        have = len(self._child_group[r.request_id].prompt_logprobs)
        first = max(r.num_computed_tokens, have - 1)
        end = min(r.num_computed_tokens + num_new_tokens, r.num_prompt_tokens - 1)
        return first, end

    def _prompt_logprob_rows(self, req: RunnerRequest, logits: torch.Tensor) -> list:
        """Logits row i sits at position first + i (see _prompt_logit_span) and predicts the
        token after it. (One call per request: small [rows, V] blocks stay in cache, which
        makes this faster on CPU than one log-softmax over the whole step.)"""
        group = self._child_group[req.request_id]
        first = max(req.num_computed_tokens, req.prompt_logits_from)
        num = min(logits.shape[0], len(group.prompt_token_ids) - 1 - first)
        if num <= 0:
            return []
        targets = torch.tensor(group.prompt_token_ids[first + 1 : first + 1 + num])
        return token_logprobs(logits[:num], targets, group.params.prompt_logprobs)

    def _append_prompt_logprobs(self, rid: str, rows: list) -> None:
        group = self._child_group[rid]
        group.prompt_logprobs.extend(logprob_dict(row, self._decode_one) for row in rows)

    def _decode_one(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)  # a token's text never changes: decode it once
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    def _output(self, group: _Group) -> RequestOutput:
        outputs = []
        for c in group.children:
            finish_reason = c.finish_reason
            stop_reason = c.stop_reason if c.error is None else c.error
            outputs.append(
                CompletionOutput(
                    index=c.index,
                    text=group.texts[c.index],
                    token_ids=list(c.output_token_ids),
                    cumulative_logprob=group.cumulative_logprob[c.index],
                    logprobs=group.logprobs[c.index],
                    finish_reason=finish_reason,
                    stop_reason=stop_reason,
                )
            )
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            prompt_logprobs=group.prompt_logprobs,
            outputs=outputs,
            finished=group.finished,
            metrics=group.children[0].metrics,
        )

    def _release(self, group: _Group) -> None:
        self._groups.pop(group.request_id, None)
        for c in group.children:
            self._child_group.pop(c.request_id, None)
            self.scheduler.finish(c.request_id, c.status)  # no-op when already released
            self._count_finished(c.finish_reason or "abort")

    def _count_finished(self, reason: str) -> None:
        self._finished_by_reason[reason] = self._finished_by_reason.get(reason, 0) + 1

    # ---- introspection -----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.kv
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_swapped=s.num_swapped,
            kv_usage=kv.usage,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            num_prompt_tokens=self._counters["prompt"],
            num_generation_tokens=self._counters["generation"],
            num_preemptions=s.num_preemptions,
            num_swap_outs=s.num_swap_outs,
            num_swap_ins=s.num_swap_ins,
            finished_by_reason=dict(self._finished_by_reason),
        )

    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    @property
    def num_generation_tokens(self) -> int:
        """Tokens sampled since the engine started (all requests)."""
        return self._counters["generation"]
