"""Test helpers for the KV manager and scheduler (H2): a fake clock, request builders, a shadow
runner that checks the KV each step would read, invariant checks and plain reference schedulers.

The shadow runner stands in for the model: the "K/V" of position p of a sequence is the tuple of
its tokens 0..p, written into slot (block_table[p // bs], p % bs). After swaps and writes, every
position a scheduled request attends to must hold exactly its own prefix, so a wrong prefix-cache
hit, a lost swap copy or a block shared by mistake shows up as a mismatch.
"""

from __future__ import annotations

import itertools
import zlib

from fastserve.engine.kv_cache import KVCacheManager
from fastserve.engine.request import Request, RequestStatus, SamplingParams, check_stop
from fastserve.engine.scheduler import CostModel, Scheduler, SchedulerConfig, SchedulerOutput


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make_request(rid, prompt, max_tokens=4, priority=0, arrival=0.0) -> Request:
    if isinstance(prompt, int):
        seed = zlib.crc32(rid.encode())
        prompt = [(seed + 7 * i) % 1000 + 2 for i in range(prompt)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(prompt), params, None, arrival_time=arrival, priority=priority)


def make_scheduler(
    policy="fcfs", num_blocks=64, block_size=4, num_host_blocks=0, caching=True, clock=None, **cfg
):
    # powers of two: quantum sums in tests are exact (decode 1/64 s, prefill 1/1024 s per token)
    cost = CostModel(prefill_s_per_token=2.0**-10, decode_s_per_step=2.0**-6)
    kv = KVCacheManager(num_blocks, block_size, caching, num_host_blocks)
    config = SchedulerConfig(policy=policy, **cfg)
    return Scheduler(config, kv, cost, clock=clock or FakeClock())


def next_token(request: Request) -> int:
    """A deterministic 'sampled' token (depends on the sequence, like a greedy model)."""
    return (sum(request.all_token_ids) * 31 + request.num_tokens) % 997 + 2


class ShadowRunner:
    """Applies swaps and writes like the real runner and checks what each request would read."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.device: dict[tuple[int, int], tuple] = {}
        self.host: dict[tuple[int, int], tuple] = {}

    def execute(self, out: SchedulerOutput, requests: dict[str, Request]) -> None:
        bs = self.kv.block_size
        # all reads before all writes, like ModelRunner.swap
        out_data = [[self.device.get((d, o)) for o in range(bs)] for d, _ in out.swap_out]
        in_data = [[self.host.get((h, o)) for o in range(bs)] for h, _ in out.swap_in]
        for (_, h), data in zip(out.swap_out, out_data):
            for o in range(bs):
                self.host[(h, o)] = data[o]
        for (_, d), data in zip(out.swap_in, in_data):
            for o in range(bs):
                self.device[(d, o)] = data[o]
        written: dict[tuple[int, int], tuple] = {}
        for s in out.scheduled:  # all writes of the step first (write_kv), then the reads
            r, table = requests[s.request_id], out.block_tables[s.request_id]
            ids, start = r.all_token_ids, r.num_computed_tokens
            for p in range(start, start + s.num_new_tokens):
                slot, value = (table[p // bs], p % bs), tuple(ids[: p + 1])
                assert written.setdefault(slot, value) == value, "two values for one slot"
                self.device[slot] = value
        for s in out.scheduled:
            r, table = requests[s.request_id], out.block_tables[s.request_id]
            ids, start = r.all_token_ids, r.num_computed_tokens
            for p in range(start + s.num_new_tokens):  # what attention reads
                got = self.device.get((table[p // bs], p % bs))
                assert got == tuple(ids[: p + 1]), f"{s.request_id}: wrong KV at position {p}"


def check_kv_invariants(kv: KVCacheManager) -> None:
    pool = kv.pool
    refs: dict[int, int] = {}
    for table in kv.tables.values():
        for b in table:
            refs[b] = refs.get(b, 0) + 1
    for block in pool.blocks:
        assert block.ref_cnt == refs.get(block.block_id, 0), f"ref_cnt of {block.block_id}"
        assert (block.ref_cnt == 0) == (block.block_id in pool.free_queue)
        if block.ref_cnt > 1:
            assert block.block_hash is not None, "shared block without a hash"
        if block.block_hash is not None:
            assert pool.cached[block.block_hash] == block.block_id
    assert len(pool.cached) == sum(b.block_hash is not None for b in pool.blocks)
    host = [b for t in kv.host_tables.values() for b in t] + kv.free_host_blocks
    assert sorted(host) == list(range(kv.num_host_blocks)), "host blocks lost or duplicated"


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg = sched.config
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs
    ids = [s.request_id for s in out.scheduled]
    assert len(set(ids)) == len(ids)
    assert not set(out.swapped_in) & set(out.swapped_out), "swapped out and in in one step"
    assert not set(ids) & (set(out.preempted) | set(out.swapped_out))
    for s in out.scheduled:
        r = sched.requests[s.request_id]
        assert s.num_new_tokens >= 1
        assert r.status is RequestStatus.RUNNING
        end = r.num_computed_tokens + s.num_new_tokens
        assert end <= r.num_tokens and s.is_prefill_chunk_final == (end == r.num_tokens)
        assert len(out.block_tables[s.request_id]) == sched.kv.blocks_for_tokens(end)
    for r in sched.requests.values():
        assert r.status.is_finished is False
        assert sched.kv.has_blocks(r.request_id) == (r.status is RequestStatus.RUNNING)
        assert sched.kv.is_swapped(r.request_id) == (r.status is RequestStatus.SWAPPED)
    check_kv_invariants(sched.kv)


def engine_step(sched: Scheduler, runner: ShadowRunner | None = None, check=True):
    """One engine step as LLMEngine does it: schedule -> run -> update -> append/stop -> finish."""
    out = sched.schedule()
    if check:
        check_step(sched, out)
    if runner is not None:
        runner.execute(out, sched.requests)
    sched.update_after_step(out)
    for s in out.scheduled:
        r = sched.requests[s.request_id]
        if s.is_prefill_chunk_final:
            r.append_output_token(next_token(r), now=sched.clock())
            if check_stop(r, sched.config.max_model_len, now=sched.clock()):
                sched.finish(r.request_id, r.status)
    return out


# ---- plain reference schedulers (no KV pressure) ------------------------------------------------


class RefState:
    def __init__(self, rid, num_prompt, max_tokens, priority, seq):
        self.rid, self.num_tokens, self.computed = rid, num_prompt, 0
        self.num_prompt, self.max_tokens, self.priority, self.seq = (
            num_prompt,
            max_tokens,
            priority,
            seq,
        )
        self.num_out = 0


class RefOrdered:
    """fcfs / priority without KV pressure: everyone unfinished in a fixed order, greedy fill."""

    def __init__(self, key, max_num_seqs, budget):
        self.key, self.max_num_seqs, self.budget = key, max_num_seqs, budget
        self.reqs: list[RefState] = []
        self.counter = itertools.count()

    def add(self, rid, num_prompt, max_tokens, priority=0, now=0.0):
        self.reqs.append(RefState(rid, num_prompt, max_tokens, priority, next(self.counter)))

    def order(self, now):
        return sorted(self.reqs, key=self.key)

    def charge(self, r, n, sampled):
        pass

    def step(self, now):
        picked, budget = [], self.budget
        for r in self.order(now):
            if len(picked) == self.max_num_seqs or budget == 0:
                break
            n = min(r.num_tokens - r.computed, budget)
            picked.append((r.rid, n))
            budget -= n
        for rid, n in picked:
            r = next(x for x in self.reqs if x.rid == rid)
            r.computed += n
            sampled = r.computed == r.num_tokens
            self.charge(r, n, sampled)
            if sampled:
                r.num_tokens += 1
                r.num_out += 1
                if r.num_out >= r.max_tokens:
                    self.reqs.remove(r)
            r.last_run = now
        return picked


class RefMLFQ(RefOrdered):
    """Skip-join MLFQ written with explicit FIFO lists per level."""

    def __init__(self, max_num_seqs, budget, num_queues, base_q, starvation_s, cost):
        super().__init__(None, max_num_seqs, budget)
        self.queues = [[] for _ in range(num_queues)]
        self.base_q, self.starvation_s, self.cost = base_q, starvation_s, cost

    def add(self, rid, num_prompt, max_tokens, priority=0, now=0.0):
        r = RefState(rid, num_prompt, max_tokens, priority, 0)
        r.used, r.last_run = 0.0, now
        need = self.cost.prefill_s(num_prompt)
        level = next(
            (k for k in range(len(self.queues)) if self.base_q * 2**k >= need),
            len(self.queues) - 1,
        )
        r.level = level
        self.queues[level].append(r)
        self.reqs.append(r)

    def _move(self, r, level):
        self.queues[r.level].remove(r)
        r.level, r.used = level, 0.0
        self.queues[level].append(r)

    def order(self, now):
        flat = [r for q in self.queues for r in sorted(q, key=lambda x: x.priority)]
        for r in flat:  # starvation promotion in rank order
            if r.level > 0 and now - r.last_run >= self.starvation_s:
                self._move(r, 0)
        return [r for q in self.queues for r in sorted(q, key=lambda x: x.priority)]

    def charge(self, r, n, sampled):
        r.used += self.cost.decode_s_per_step if (sampled and n == 1) else self.cost.prefill_s(n)
        if r.used >= self.base_q * 2**r.level:
            self._move(r, min(r.level + 1, len(self.queues) - 1))
        if sampled and r.num_out + 1 >= r.max_tokens:
            self.queues[r.level].remove(r)
