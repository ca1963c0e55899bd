"""Scheduler: which tokens of which requests run in the next step, and where their KV lives.

    sched = Scheduler(SchedulerConfig(policy="mlfq"), KVCacheManager(512, 16, num_host_blocks=256),
                      CostModel(prefill_s_per_token=1e-4, decode_s_per_step=0.02))
    sched.add_request(request)                 # -> None, or the reason it was rejected
    out = sched.schedule()                     # SchedulerOutput: tokens per request, tables, swaps
    ... runner.execute(...) ...
    sched.update_after_step(out)               # num_computed_tokens += num_new_tokens
    ... engine appends sampled tokens, checks stops ...
    sched.finish(request_id, RequestStatus.FINISHED_STOPPED)     # frees its KV

No phases (vLLM v1): each request has num_computed_tokens (K/V in the cache) and num_tokens; a step
gives it min(num_tokens - num_computed_tokens, budget left) new tokens, so a long prompt runs in
chunks and a decode is the 1-token case. The request samples when the step reaches num_tokens.

    order (policy rank):  A   B   C   D   E         budget 8 tokens, max_num_seqs 3
    A decode        1     [A]
    B prompt 20/12  7     [A B.......]             B gets a 7-token chunk, budget exhausted
    C, D, E               not scheduled this step (mlfq: they keep their KV, token granularity)

When a request needs more KV blocks than are free, lower-ranked requests holding KV (and not in
this step) are preempted, lowest first, if the policy allows it (policies.py): with
preemption_mode "swap" their KV goes to the host tier when it fits (status SWAPPED), otherwise
it is dropped (status PREEMPTED, num_computed_tokens = 0, recomputed later; the prefix cache often
gives most of it back). mlfq also swaps proactively: when free blocks fall under
swap_out_threshold, it swaps out the KV-holding requests that will run last; when there is room,
it swaps in the swapped requests ranked within the next max_num_seqs + swap_in_lookahead, before
their turn. A request is never swapped out and in within one step.

Requests that can never run are finished here, not raised: a prompt longer than max_model_len or
needing more blocks than the whole pool -> FINISHED_ERROR with `request.error` set; a sequence
that outgrows the pool -> FINISHED_LENGTH. They are reported in SchedulerOutput.finished.

What it does not know: tensors, the model, sampling, stop conditions (the engine decides stops and
calls finish). Time comes only from the injected clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastserve.engine.kv_cache import KVCacheManager
from fastserve.engine.policies import FCFSPolicy, MLFQPolicy, PriorityPolicy
from fastserve.engine.request import Request, RequestStatus

POLICIES = ("fcfs", "mlfq", "priority")


@dataclass
class SchedulerConfig:
    # "fcfs" | "mlfq" | "priority" (see policies.py).
    policy: str = "mlfq"
    # At most this many requests get tokens in one step.
    max_num_seqs: int = 64
    # At most this many tokens (prefill chunks + decodes) are scheduled in one step.
    max_num_batched_tokens: int = 512
    # Longest sequence (prompt + output) a request may reach.
    max_model_len: int = 2048
    # Split prompts over steps; when False a prompt runs whole (needs budget >= max_model_len).
    enable_chunked_prefill: bool = True
    # How a preempted request gives up its KV: "recompute" (drop) or "swap" (host tier, if room).
    preemption_mode: str = "recompute"
    # MLFQ queues; quantum of level k = mlfq_base_quantum_s * 2**k.
    mlfq_num_queues: int = 4
    # MLFQ top quantum in seconds; None -> 8 decode steps of the cost model.
    mlfq_base_quantum_s: float | None = None
    # MLFQ: a request not run for this long is promoted to queue 0.
    starvation_limit_s: float = 5.0
    # MLFQ proactive swapping starts when free device blocks < this fraction of all blocks.
    swap_out_threshold: float = 0.1
    # MLFQ: swapped requests ranked within max_num_seqs + this many are swapped in ahead of time.
    swap_in_lookahead: int = 4

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(
                f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}"
            )
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "mlfq_num_queues"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_model_len ({self.max_model_len}) without "
                f"chunked prefill, got {self.max_num_batched_tokens}"
            )
        if not 0 <= self.swap_out_threshold < 1:
            raise ValueError(f"swap_out_threshold must be in [0, 1), got {self.swap_out_threshold}")
        if self.swap_in_lookahead < 0:
            raise ValueError(f"swap_in_lookahead must be >= 0, got {self.swap_in_lookahead}")


@dataclass
class CostModel:
    # Estimated seconds of prefill compute per prompt token (profiled by the runner).
    prefill_s_per_token: float
    # Estimated seconds of one decode step.
    decode_s_per_step: float

    def prefill_s(self, num_tokens: int) -> float:
        return self.prefill_s_per_token * num_tokens


@dataclass
class ScheduledRequest:
    # The request that computes tokens this step.
    request_id: str
    # Tokens computed this step: all_token_ids[num_computed_tokens : num_computed_tokens + this].
    num_new_tokens: int
    # True when the step reaches num_tokens: the last token's logits are sampled (last prompt
    # chunk or a decode).
    is_prefill_chunk_final: bool


@dataclass
class SchedulerOutput:
    # Requests computing tokens this step, in batch order (policy rank).
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Sum of num_new_tokens (<= max_num_batched_tokens).
    num_batched_tokens: int = 0
    # Full device block table of each scheduled request (covers computed + new tokens).
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    # (device block, host block) copies to do BEFORE this step runs.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    # (host block, device block) copies to do BEFORE this step runs.
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    # Requests that lost their KV this step (recompute later).
    preempted: list[str] = field(default_factory=list)
    # Requests whose KV moved to the host tier / came back to the device this step.
    swapped_out: list[str] = field(default_factory=list)
    swapped_in: list[str] = field(default_factory=list)
    # Requests the scheduler finished itself since the last step -> reason (FINISHED_ERROR for
    # rejected prompts, FINISHED_LENGTH for a sequence that outgrew the KV pool).
    finished: dict[str, str] = field(default_factory=dict)


class _Step:
    """Working state of one schedule() call."""

    def __init__(self, out: SchedulerOutput, order: list, budget: int, now: float) -> None:
        self.out = out
        self.order = order
        self.rank = {r.request_id: i for i, r in enumerate(order)}
        self.budget = budget
        self.now = now
        self.scheduled: set[str] = set()
        self.displaced: set[str] = set()  # preempted or swapped out this step: not run again


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        cost: CostModel,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kv = kv
        self.cost = cost
        self.clock = clock
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._finished: dict[str, str] = {}  # finished here since the last schedule() -> reason
        self.num_preemptions = 0  # preemptions so far (recompute or swap; not proactive swaps)
        self.num_swap_outs = 0  # KV moves to the host tier (preemption or proactive)
        self.num_swap_ins = 0  # requests whose KV came back to the device
        if config.policy == "mlfq":
            base = config.mlfq_base_quantum_s
            if base is None:
                base = 8 * cost.decode_s_per_step
            self.policy = MLFQPolicy(config.mlfq_num_queues, base, config.starvation_limit_s, cost)
        elif config.policy == "priority":
            self.policy = PriorityPolicy()
        else:
            self.policy = FCFSPolicy()

    # ---- requests in and out ---------------------------------------------------------------------

    def add_request(self, request: Request) -> str | None:
        """Queue a request; returns None, or the reason it can never run (it is then finished
        with FINISHED_ERROR and request.error set, and reported by the next schedule())."""
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already queued")
        n, bs, pool = request.num_prompt_tokens, self.kv.block_size, self.kv.num_blocks
        reason = None  # the prompt itself was checked by the engine (request.check_prompt)
        if self.kv.blocks_for_tokens(n) > pool:
            reason = (
                f"prompt of {n} tokens needs {self.kv.blocks_for_tokens(n)} KV blocks of {bs} "
                f"tokens but the whole KV cache has {pool}"
            )
        if reason is not None:
            request.error = reason
            request.finish(RequestStatus.FINISHED_ERROR, now=self.clock())
            self._finished[rid] = reason
            return reason
        request.status = RequestStatus.WAITING
        request.last_run_time = self.clock()  # the starvation timer runs on the scheduler's clock
        self.requests[rid] = request
        self.policy.on_add(request, request.last_run_time)
        return None

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """Remove a request and free its KV (device and host). A request already in a finished
        state (the engine's check_stop) keeps it; otherwise it moves to `status`."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if not request.status.is_finished:
            request.finish(status, now=self.clock())
        self.kv.free(request)
        self.policy.on_finish(request_id)
        return request

    def abort(self, request_id: str) -> Request | None:
        """Abort a queued or running request: its blocks are free when this returns."""
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        """Requests holding device KV (scheduled in the last step or not)."""
        return sum(r.status is RequestStatus.RUNNING for r in self.requests.values())

    @property
    def num_waiting(self) -> int:
        return sum(
            r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            for r in self.requests.values()
        )

    @property
    def num_swapped(self) -> int:
        return sum(r.status is RequestStatus.SWAPPED for r in self.requests.values())

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        cfg, kv = self.config, self.kv
        out = SchedulerOutput(finished=self._finished)
        self._finished = {}
        now = self.clock()
        self.policy.before_schedule(list(self.requests.values()), now)
        order = sorted(self.requests.values(), key=self.policy.rank_key)
        step = _Step(out, order, cfg.max_num_batched_tokens, now)
        for r in order:
            if len(out.scheduled) >= cfg.max_num_seqs or step.budget <= 0:
                break
            if r.request_id in step.displaced:
                continue
            if (
                r.num_tokens > cfg.max_model_len
                or kv.blocks_for_tokens(r.num_tokens) > kv.num_blocks
            ):
                reason = f"sequence of {r.num_tokens} tokens no longer fits the context or KV cache"
                self.finish(r.request_id, RequestStatus.FINISHED_LENGTH)
                out.finished[r.request_id] = reason
                continue
            if not self._schedule_one(r, step) and self.policy.strict_order:
                break
        if self.policy.proactive_swap and kv.num_host_blocks > 0:
            self._proactive_swap(step)
        for s in out.scheduled:
            out.block_tables[s.request_id] = kv.block_table(s.request_id)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _schedule_one(self, r: Request, step: _Step) -> bool:
        """Give `r` a share of the step; False when it cannot run now."""
        kv, rid = self.kv, r.request_id
        swapped = r.status is RequestStatus.SWAPPED
        hits, hit_tokens = [], 0
        if not swapped and not kv.has_blocks(rid):  # waiting or preempted: prefix cache lookup
            hits, hit_tokens = kv.get_computed_blocks(r)
        remaining = r.num_tokens - r.num_computed_tokens - hit_tokens
        if remaining <= 0:
            return True  # nothing to compute until the engine appends a token
        n = min(remaining, step.budget)
        if n < remaining and not self.config.enable_chunked_prefill:
            return False
        computed = (hits, hit_tokens)
        if swapped:  # room for the swapped-in blocks and this step's tokens, or stay on the host
            need = kv.blocks_for_tokens(r.num_computed_tokens + n)
            if need > kv.num_free_blocks and not self._make_room(r, need, lambda: need, step):
                return False
            step.out.swap_in += kv.swap_in(r)
            step.out.swapped_in.append(rid)
            r.status = RequestStatus.RUNNING
            self.num_swap_ins += 1
        elif kv.num_blocks_needed(r, n, computed) > kv.num_free_blocks:
            held = len(kv.tables.get(rid, ()))
            upper = kv.blocks_for_tokens(r.num_computed_tokens + hit_tokens + n) - held
            if not self._make_room(r, upper, lambda: kv.num_blocks_needed(r, n, computed), step):
                if self.policy.self_preempt and r.status is RequestStatus.RUNNING:
                    self._preempt(r, step)
                return False
        if kv.allocate_slots(r, n, computed) is None:
            raise RuntimeError(f"allocation for {rid} failed after the room check")
        if r.status is not RequestStatus.RUNNING:
            r.status = RequestStatus.RUNNING
            self.policy.on_admit(r)
        r.num_computed_tokens += hit_tokens
        r.last_run_time = step.now
        final = r.num_computed_tokens + n == r.num_tokens
        step.out.scheduled.append(ScheduledRequest(rid, n, final))
        step.scheduled.add(rid)
        step.budget -= n
        return True

    def _make_room(self, r: Request, upper: int, need: Callable[[], int], step: _Step) -> bool:
        """Preempt lower-ranked KV holders, lowest first, until need() blocks are free. Does
        nothing unless freeing all allowed victims would give `upper` (>= need()) blocks."""
        kv, my_rank = self.kv, step.rank[r.request_id]
        victims = [
            v
            for v in reversed(step.order)
            if step.rank[v.request_id] > my_rank
            and v.request_id in self.requests
            and kv.has_blocks(v.request_id)
            and v.request_id not in step.scheduled
            and self.policy.may_preempt(r, v)
        ]
        releasable = kv.num_releasable_blocks(v.request_id for v in victims)
        if upper > kv.num_free_blocks + releasable:
            return False
        for v in victims:
            if need() <= kv.num_free_blocks:
                break
            self._preempt(v, step)
        return need() <= kv.num_free_blocks

    def _preempt(self, v: Request, step: _Step) -> None:
        kv, rid, out = self.kv, v.request_id, step.out
        if (
            self.config.preemption_mode == "swap"
            and rid not in out.swapped_in
            and kv.can_swap_out(v)
        ):
            out.swap_out += kv.swap_out(v)
            out.swapped_out.append(rid)
            v.status = RequestStatus.SWAPPED
            self.num_swap_outs += 1
        else:
            kv.free(v)
            v.num_computed_tokens = 0
            v.status = RequestStatus.PREEMPTED
            out.preempted.append(rid)
        v.num_preemptions += 1
        self.num_preemptions += 1
        step.displaced.add(rid)
        self.policy.on_preempted(v)

    def _proactive_swap(self, step: _Step) -> None:
        """Keep >= swap_out_threshold of the device blocks free by moving the KV of the requests
        that run last to the host; with room to spare, bring back those whose turn is near."""
        kv, out = self.kv, step.out
        low = self.config.swap_out_threshold * kv.num_blocks
        if kv.num_free_blocks < low:
            for v in reversed(step.order):
                if kv.num_free_blocks >= low:
                    break
                rid = v.request_id
                if (
                    v.status is RequestStatus.RUNNING
                    and rid in self.requests
                    and rid not in step.scheduled
                    and rid not in out.swapped_in
                    and kv.can_swap_out(v)
                ):
                    out.swap_out += kv.swap_out(v)
                    out.swapped_out.append(rid)
                    v.status = RequestStatus.SWAPPED
                    self.num_swap_outs += 1
                    step.displaced.add(rid)
            return
        window = step.order[: self.config.max_num_seqs + self.config.swap_in_lookahead]
        for v in window:
            rid = v.request_id
            if v.status is not RequestStatus.SWAPPED or rid in step.displaced:
                continue
            if kv.num_free_blocks - len(kv.host_tables[rid]) < low:
                break  # keep the order: do not let a later request jump ahead
            out.swap_in += kv.swap_in(v)
            out.swapped_in.append(rid)
            v.status = RequestStatus.RUNNING
            self.num_swap_ins += 1

    def update_after_step(self, output: SchedulerOutput) -> None:
        """After the runner computed the step: advance num_computed_tokens and charge MLFQ
        quanta. Call before finishing requests."""
        for s in output.scheduled:
            r = self.requests.get(s.request_id)
            if r is None:  # aborted while the step ran
                continue
            r.num_computed_tokens += s.num_new_tokens
            self.policy.after_step(r, s.num_new_tokens, s.is_prefill_chunk_final)
