"""Scheduling policies: the order in which the scheduler offers requests a place in the step.

The scheduler (scheduler.py) walks all unfinished requests in `rank_key` order and gives each a
share of the step's token budget; a policy only says who comes first, who may take KV blocks
from whom, and how a request's rank changes as it runs.

    fcfs      (0, admission)  running   |  (1, admission) swapped  |  (2, arrival) waiting
              preempted requests go to the front of waiting; only running requests preempt
    priority  (priority, arrival)       a request preempts lower priorities (any state), and a
              running request also preempts later arrivals of its own priority
    mlfq      (queue level, priority, order of entry into the level)
              skip-join:  level = min k with base_quantum * 2^k >= prefill_s(prompt)
              demotion:   quantum_used_s >= base_quantum * 2^level  ->  level + 1, used = 0
              starvation: not run for starvation_limit_s  ->  level 0, used = 0

    quantum  q0 = b   q1 = 2b   q2 = 4b   q3 = 8b      (mlfq_num_queues = 4)
    a prompt costing 3b joins Q2 directly; a 0.5b prompt joins Q0

What it does not know: KV blocks and budgets (the scheduler applies them), tensors, time except
the `now` it is handed. State that is not a Request field lives here, keyed by request id.
"""

from __future__ import annotations

import itertools

from fastserve.engine.request import RequestStatus


class FCFSPolicy:
    """Running first in admission order, then swapped, then waiting (preempted at the front)."""

    name = "fcfs"
    strict_order = True  # stop at the first request that cannot be scheduled (no overtaking)
    self_preempt = True  # a running request that cannot grow gives up its own KV
    proactive_swap = False

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._front = itertools.count(-1, -1)  # preempted requests: ever further to the front
        self._wait_seq: dict[str, int] = {}
        self._run_seq: dict[str, int] = {}

    def on_add(self, request, now: float) -> None:
        self._wait_seq[request.request_id] = next(self._counter)

    def rank_key(self, request) -> tuple:
        rid = request.request_id
        if request.status is RequestStatus.RUNNING:
            return (0, self._run_seq[rid])
        if request.status is RequestStatus.SWAPPED:
            return (1, self._run_seq[rid])
        return (2, self._wait_seq[rid])

    def may_preempt(self, request, victim) -> bool:
        """`victim` ranks below `request`; never preempt to admit a new request."""
        return request.status is RequestStatus.RUNNING

    def on_admit(self, request) -> None:
        """The request got KV blocks for the first time since waiting."""
        self._run_seq[request.request_id] = next(self._counter)

    def on_preempted(self, request) -> None:
        if request.status is RequestStatus.PREEMPTED:
            self._wait_seq[request.request_id] = next(self._front)

    def before_schedule(self, requests, now: float) -> None:
        pass

    def after_step(self, request, num_new_tokens: int, sampled: bool) -> None:
        pass

    def on_finish(self, request_id: str) -> None:
        self._wait_seq.pop(request_id, None)
        self._run_seq.pop(request_id, None)


class PriorityPolicy(FCFSPolicy):
    """Ordered by (priority, arrival); lower priority values are served and kept first."""

    name = "priority"

    def rank_key(self, request) -> tuple:
        return (request.priority, request.arrival_time, self._wait_seq[request.request_id])

    def may_preempt(self, request, victim) -> bool:
        if victim.priority > request.priority:
            return True
        return request.status is RequestStatus.RUNNING

    def on_preempted(self, request) -> None:
        pass  # the rank does not depend on the state


class MLFQPolicy:
    """Skip-join multi-level feedback queue (FastServe, Wu et al. 2023)."""

    name = "mlfq"
    strict_order = False  # a request that does not fit is skipped; lower queues may still run
    self_preempt = False  # a request that cannot run this step keeps its KV (token granularity)
    proactive_swap = True

    def __init__(self, num_queues: int, base_quantum_s: float, starvation_limit_s: float, cost):
        if num_queues < 1:
            raise ValueError(f"mlfq_num_queues must be >= 1, got {num_queues}")
        if not base_quantum_s > 0:
            raise ValueError(f"mlfq_base_quantum_s must be > 0, got {base_quantum_s}")
        self.num_queues = num_queues
        self.base_quantum_s = base_quantum_s
        self.starvation_limit_s = starvation_limit_s
        self.cost = cost
        self._counter = itertools.count()
        self._seq: dict[str, int] = {}  # order of entry into the current level (FIFO)

    def quantum_s(self, level: int) -> float:
        return self.base_quantum_s * 2**level

    def entry_level(self, num_prompt_tokens: int) -> int:
        """Skip-join: the highest queue whose quantum covers the prompt's estimated prefill."""
        need = self.cost.prefill_s(num_prompt_tokens)
        for level in range(self.num_queues):
            if self.quantum_s(level) >= need:
                return level
        return self.num_queues - 1

    def _enter(self, request, level: int) -> None:
        request.queue_level = level
        request.quantum_used_s = 0.0
        self._seq[request.request_id] = next(self._counter)

    def on_add(self, request, now: float) -> None:
        self._enter(request, self.entry_level(request.num_prompt_tokens))

    def rank_key(self, request) -> tuple:
        return (request.queue_level, request.priority, self._seq[request.request_id])

    def may_preempt(self, request, victim) -> bool:
        return True  # the victim ranks lower: a later or lower-queue job

    def on_admit(self, request) -> None:
        pass

    def on_preempted(self, request) -> None:
        pass  # keeps its level and place; it simply runs again when its turn comes

    def before_schedule(self, requests, now: float) -> None:
        """Starvation: promote requests not run for starvation_limit_s to the top queue (in
        their current rank order, so promoted requests keep their relative order)."""
        for r in sorted(requests, key=self.rank_key):
            if r.queue_level > 0 and now - r.last_run_time >= self.starvation_limit_s:
                self._enter(r, 0)

    def after_step(self, request, num_new_tokens: int, sampled: bool) -> None:
        """Charge the step's estimated cost; demote on an exhausted quantum (the bottom queue
        round-robins: the request goes to its tail with a fresh quantum)."""
        decode = sampled and num_new_tokens == 1
        cost = self.cost.decode_s_per_step if decode else self.cost.prefill_s(num_new_tokens)
        request.quantum_used_s += cost
        if request.quantum_used_s >= self.quantum_s(request.queue_level):
            self._enter(request, min(request.queue_level + 1, self.num_queues - 1))

    def on_finish(self, request_id: str) -> None:
        self._seq.pop(request_id, None)
