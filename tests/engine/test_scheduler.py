"""Scheduler without a model: policies against plain reference schedulers, budgets, chunked
prefill, preemption and swapping under KV pressure (checked by a shadow runner that verifies the
K/V every request reads), rejections, and all blocks free at the end."""

from __future__ import annotations

import math
import random

import pytest
from h2_fakes import (
    FakeClock,
    RefMLFQ,
    RefOrdered,
    ShadowRunner,
    check_kv_invariants,
    engine_step,
    make_request,
    make_scheduler,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve.engine.request import RequestStatus
from fastserve.engine.scheduler import SchedulerConfig


def scheduled(out):
    return [(s.request_id, s.num_new_tokens) for s in out.scheduled]


def drain(sched, runner=None, max_steps=2000):
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return
        engine_step(sched, runner)
        sched.clock.advance(0.01)
    raise AssertionError("requests did not finish")


# ---- policies vs reference schedulers (no KV pressure) -------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority", "mlfq"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_policy_matches_reference_without_kv_pressure(policy, seed):
    rng = random.Random(seed)
    max_seqs, budget = rng.randint(1, 5), rng.randint(1, 40)
    clock = FakeClock()
    sched = make_scheduler(
        policy, num_blocks=4096, block_size=4, clock=clock, max_num_seqs=max_seqs,
        max_num_batched_tokens=budget, starvation_limit_s=0.5, mlfq_base_quantum_s=0.02,
    )  # fmt: skip
    if policy == "fcfs":
        ref = RefOrdered(lambda r: r.seq, max_seqs, budget)
    elif policy == "priority":
        ref = RefOrdered(lambda r: (r.priority, r.seq), max_seqs, budget)
    else:
        ref = RefMLFQ(max_seqs, budget, 4, 0.02, 0.5, sched.cost)
    arrivals = sorted((rng.randint(0, 30), i) for i in range(12))
    for step in range(2000):
        for t, i in arrivals:
            if t == step:
                n, m, p = rng.randint(1, 60), rng.randint(1, 8), rng.randint(-1, 1)
                sched.add_request(make_request(f"r{i}", n, m, p, arrival=clock.t))
                ref.add(f"r{i}", n, m, p, clock.t)
        expected = ref.step(clock.t)
        got = scheduled(engine_step(sched))
        assert got == expected, f"step {step}"
        clock.advance(0.05)
        if step > 30 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished() and sched.kv.num_free_blocks == 4096


def test_fcfs_order_budget_and_chunks():
    sched = make_scheduler("fcfs", max_num_seqs=3, max_num_batched_tokens=10)
    for rid, n in [("a", 4), ("b", 13), ("c", 2), ("d", 1)]:
        sched.add_request(make_request(rid, n, max_tokens=3))
    assert scheduled(engine_step(sched)) == [("a", 4), ("b", 6)]
    assert scheduled(engine_step(sched)) == [("a", 1), ("b", 7), ("c", 2)]  # b's final chunk
    assert scheduled(engine_step(sched)) == [("a", 1), ("b", 1), ("c", 1)]  # max_num_seqs


def test_chunked_prefill_chunks_sum_to_the_prompt():
    sched = make_scheduler("fcfs", max_num_batched_tokens=16)
    sched.add_request(make_request("a", 100, max_tokens=1))
    chunks, finals = [], []
    while sched.has_unfinished():
        out = engine_step(sched)
        chunks += [s.num_new_tokens for s in out.scheduled]
        finals += [s.is_prefill_chunk_final for s in out.scheduled]
    assert chunks == [16] * (100 // 16) + [100 % 16]
    assert finals == [False] * (100 // 16) + [True]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(
        "fcfs", max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False
    )
    sched.add_request(make_request("a", 20, max_tokens=2))
    sched.add_request(make_request("b", 20, max_tokens=2))
    assert scheduled(engine_step(sched)) == [("a", 20)]  # b would need a chunk: waits
    assert scheduled(engine_step(sched)) == [("a", 1), ("b", 20)]  # 1 + 20 <= 32
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(enable_chunked_prefill=False, max_num_batched_tokens=8, max_model_len=16)


# ---- MLFQ ----------------------------------------------------------------------------------------


def test_skip_join_entry_level():
    sched = make_scheduler("mlfq", mlfq_num_queues=4, num_blocks=1024, max_model_len=4096)
    cost = sched.cost
    base = 8 * cost.decode_s_per_step  # the default top quantum
    assert sched.policy.base_quantum_s == base
    for n in [10, 127, 128, 129, 255, 257, 600, 1024, 1025, 3000]:
        r = make_request(f"r{n}", n)
        sched.add_request(r)
        need = cost.prefill_s(n)  # smallest k with base * 2^k >= need, clamped to the last queue
        expected = min(3, max(0, math.ceil(math.log2(need / base))))
        assert r.queue_level == expected, n


def test_demotion_after_quantum_and_newcomer_overtakes():
    # quantum of queue 0 = 8 decodes (8/64 s); prefill of 10 tokens costs 10/1024 = 0.625/64 s,
    # so 1 prefill + 7 decodes (7.625/64) stay, the 8th decode (8.625/64) demotes: 9 steps at
    # level 0; level 1 (16/64 s) takes 16 decodes.
    sched = make_scheduler("mlfq", max_num_seqs=1, mlfq_num_queues=3)
    a = make_request("a", 10, max_tokens=100)
    sched.add_request(a)
    levels = []
    for _ in range(8 + 16 + 1):
        engine_step(sched)
        levels.append(a.queue_level)
    assert levels == [0] * 8 + [1] * 16 + [2]  # after step i
    table = sched.kv.block_table("a")
    b = make_request("b", 5, max_tokens=3)
    sched.add_request(b)  # joins queue 0: runs ahead of the demoted a
    assert scheduled(engine_step(sched)) == [("b", 5)]
    assert a.status is RequestStatus.RUNNING and sched.kv.block_table("a") == table  # keeps KV


def test_starvation_promotion_with_fake_clock():
    def first_run_of_long(limit):
        clock = FakeClock()
        sched = make_scheduler(
            "mlfq", num_blocks=256, clock=clock, max_num_seqs=1, starvation_limit_s=limit
        )
        long_ = make_request("long", 300, max_tokens=2)  # 300/1024 s -> queue 2 (quantum 0.5)
        sched.add_request(long_)
        sched.add_request(make_request("hog", 10, max_tokens=10_000))  # queue 0
        assert long_.queue_level == 2
        for step in range(100):
            out = engine_step(sched)
            if "long" in [s.request_id for s in out.scheduled]:
                return step
            clock.advance(1.0)

    # hog: 9 steps in queue 0 (steps 0-8, see the demotion test), 16 in queue 1 (9-24), then
    # queue 2 behind long.
    assert first_run_of_long(limit=1e9) == 9 + 16
    # long waits 5 s -> promoted to queue 0 at step 5 (behind hog); runs once hog is demoted.
    assert first_run_of_long(limit=5.0) == 9


# ---- KV pressure: preemption and swapping --------------------------------------------------------


def test_fcfs_preempts_the_newest_running_request_recompute():
    sched = make_scheduler("fcfs", num_blocks=4, block_size=4)
    sched.add_request(make_request("old", 7, max_tokens=20))
    sched.add_request(make_request("new", 7, max_tokens=20))
    runner = ShadowRunner(sched.kv)
    engine_step(sched, runner)  # both prefill: 2 blocks each, pool full
    out = engine_step(sched, runner)  # both decode position 7 (fits block 1)
    assert scheduled(out) == [("old", 1), ("new", 1)]
    out = engine_step(sched, runner)  # old needs a 3rd block: the newest gives its KV up
    assert out.preempted == ["new"] and scheduled(out) == [("old", 1)]
    new = sched.requests["new"]
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.num_preemptions == 1 and sched.num_preemptions == 1
    drain(sched, runner)
    assert sched.kv.num_free_blocks == 4


def test_fcfs_swap_mode_moves_the_victim_to_the_host():
    sched = make_scheduler(
        "fcfs", num_blocks=4, block_size=4, num_host_blocks=8, preemption_mode="swap"
    )
    sched.add_request(make_request("old", 7, max_tokens=20))
    sched.add_request(make_request("new", 7, max_tokens=20))
    runner = ShadowRunner(sched.kv)
    engine_step(sched, runner)
    engine_step(sched, runner)
    table = sched.kv.block_table("new")
    out = engine_step(sched, runner)
    assert out.swapped_out == ["new"] and [d for d, _ in out.swap_out] == table
    assert sched.requests["new"].status is RequestStatus.SWAPPED
    assert sched.requests["new"].num_computed_tokens == 8  # KV kept, on the host
    drain(sched, runner)
    assert sched.kv.num_free_blocks == 4 and sched.kv.num_free_host_blocks == 8


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_priority_preempts_lower_priority_fcfs_never_preempts_to_admit(policy):
    sched = make_scheduler(policy, num_blocks=4, block_size=4)
    runner = ShadowRunner(sched.kv)
    sched.add_request(make_request("low", 14, max_tokens=2, priority=1))
    engine_step(sched, runner)  # low holds all 4 blocks
    sched.add_request(make_request("high", 4, max_tokens=2, priority=0))
    out = engine_step(sched, runner)
    if policy == "priority":
        assert out.preempted == ["low"] and scheduled(out) == [("high", 4)]
    else:
        assert not out.preempted and scheduled(out) == [("low", 1)]
    drain(sched, runner)
    assert sched.kv.num_free_blocks == 4


def test_mlfq_proactive_swap_out_picks_the_requests_that_run_last():
    sched = make_scheduler(
        "mlfq", num_blocks=10, block_size=4, num_host_blocks=10, max_num_seqs=2,
        swap_out_threshold=0.3, mlfq_base_quantum_s=100.0,
    )  # fmt: skip
    runner = ShadowRunner(sched.kv)
    for rid in ["r0", "r1"]:
        sched.add_request(make_request(rid, 8, max_tokens=50))
    engine_step(sched, runner)  # r0, r1 prefill: 4 blocks used, 6 free
    for rid in ["h0", "h1"]:
        sched.add_request(make_request(rid, 8, max_tokens=2, priority=-1))  # rank above r0, r1
    out = engine_step(sched, runner)
    # h0, h1 take 4 blocks -> 2 free < 0.3 * 10: swap out from the bottom of the order: r1
    assert scheduled(out) == [("h0", 8), ("h1", 8)]
    assert out.swapped_out == ["r1"] and not out.preempted
    out = engine_step(sched, runner)  # h0, h1 decode into a 3rd block each: 4 -> 2 free
    assert out.swapped_out == ["r0"] and sched.num_swapped == 2
    assert sched.num_running == 0  # h0, h1 finished (max_tokens=2): all 10 blocks free again
    out = engine_step(sched, runner)  # r0, r1 are next: back in, in rank order, and run
    assert out.swapped_in == ["r0", "r1"] and scheduled(out) == [("r0", 1), ("r1", 1)]
    drain(sched, runner)
    assert sched.kv.num_free_blocks == 10 and sched.kv.num_free_host_blocks == 10


def test_mlfq_swaps_in_ahead_of_turn():
    sched = make_scheduler(
        "mlfq", num_blocks=16, block_size=4, num_host_blocks=8, max_num_seqs=1,
        swap_out_threshold=0.25, swap_in_lookahead=1, mlfq_base_quantum_s=100.0,
    )  # fmt: skip
    runner = ShadowRunner(sched.kv)
    b = make_request("b", 8, max_tokens=5)
    sched.add_request(b)
    engine_step(sched, runner)  # b: 2 blocks
    sched.add_request(make_request("a", 44, max_tokens=2, priority=-1))  # 11 blocks, ranks first
    out = engine_step(sched, runner)  # a runs; 3 free < 4 -> b (not running) goes to the host
    assert scheduled(out) == [("a", 44)] and out.swapped_out == ["b"]
    out = engine_step(sched, runner)  # a decodes (4 free, 4 - 2 < 4: b stays out), finishes
    assert not out.swapped_in and not out.swapped_out and b.status is RequestStatus.SWAPPED
    sched.add_request(make_request("x", 4, max_tokens=3, priority=-2))  # takes the only seat
    out = engine_step(sched, runner)
    # b ranks second, inside max_num_seqs + lookahead = 2: swapped in before its turn, not run
    assert scheduled(out) == [("x", 4)] and out.swapped_in == ["b"]
    assert b.status is RequestStatus.RUNNING and sched.kv.has_blocks("b")
    drain(sched, runner)
    assert sched.kv.num_free_blocks == 16 and sched.kv.num_free_host_blocks == 8


def test_prefix_cache_hit_in_the_scheduler():
    sched = make_scheduler("fcfs", block_size=4)
    shared = list(range(50, 62))  # 3 full blocks
    sched.add_request(make_request("a", shared + [1], max_tokens=1))
    a_table = engine_step(sched).block_tables["a"]  # a finishes: its blocks stay cached
    sched.add_request(make_request("b", shared + [2, 3], max_tokens=2))
    out = engine_step(sched)
    assert scheduled(out) == [("b", 2)]  # 12 of 14 tokens served by the prefix cache
    assert out.block_tables["b"][:3] == a_table[:3]
    assert sched.kv.prefix_hits_tokens == 12
    assert sched.kv.prefix_queries_tokens == 13 + 14


def test_prefix_shared_within_one_step():
    # blocks are registered when allocated, so b (same step, after a) reuses a's prefix blocks;
    # the shadow runner checks b reads K/V that a writes in that very step
    sched = make_scheduler("fcfs", block_size=4)
    runner = ShadowRunner(sched.kv)
    shared = list(range(50, 62))
    sched.add_request(make_request("a", shared + [1], max_tokens=2))
    sched.add_request(make_request("b", shared + [2, 3], max_tokens=2))
    out = engine_step(sched, runner)
    assert scheduled(out) == [("a", 13), ("b", 2)]
    assert out.block_tables["b"][:3] == out.block_tables["a"][:3]
    drain(sched, runner)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


# ---- rejections, aborts, end state ---------------------------------------------------------------


def test_prompts_larger_than_the_kv_pool_are_rejected_alone():
    # prompt length vs the context is the engine's check (request.check_prompt); the scheduler
    # rejects what only it knows: a prompt the whole KV pool cannot hold
    sched = make_scheduler("mlfq", num_blocks=8, block_size=4, max_model_len=40)
    too_big = make_request("too_big", 33)  # 9 blocks > 8 in the pool
    ok = make_request("ok", 10, max_tokens=3)
    assert "9 KV blocks" in sched.add_request(too_big)
    assert sched.add_request(ok) is None
    assert too_big.status is RequestStatus.FINISHED_ERROR and too_big.finish_reason == "error"
    assert too_big.error
    out = engine_step(sched)
    assert set(out.finished) == {"too_big"} and scheduled(out) == [("ok", 10)]
    drain(sched)
    assert ok.status is RequestStatus.FINISHED_LENGTH and ok.num_output_tokens == 3


def test_sequence_that_outgrows_the_pool_finishes_with_length():
    sched = make_scheduler("fcfs", num_blocks=2, block_size=4, max_model_len=100)
    r = make_request("a", 6, max_tokens=50)
    sched.add_request(r)
    drain(sched)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 2 * 4 + 1
    assert sched.kv.num_free_blocks == 2


def test_abort_frees_blocks_at_once():
    sched = make_scheduler("mlfq", num_blocks=16, block_size=4, num_host_blocks=4)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 9, max_tokens=20))
    engine_step(sched)
    engine_step(sched)
    assert sched.kv.num_free_blocks < 16
    assert sched.abort("r1").status is RequestStatus.FINISHED_ABORTED
    assert not sched.kv.has_blocks("r1") and "r1" not in sched.requests
    assert sched.abort("r1") is None
    sched.abort("r0")
    sched.abort("r2")
    assert sched.kv.num_free_blocks == 16 and not sched.has_unfinished()


@pytest.mark.parametrize("policy", ["fcfs", "priority", "mlfq"])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_workload_under_kv_pressure(policy, mode, seed):
    """Tiny pools: preemption, swapping and prefix hits on every step; budgets hold, the K/V each
    request reads is its own (shadow runner), everything finishes and every block ends free."""
    rng = random.Random(seed)
    clock = FakeClock()
    sched = make_scheduler(
        policy, num_blocks=rng.randint(6, 14), block_size=rng.choice([2, 4]),
        num_host_blocks=rng.choice([0, 4, 12]), clock=clock, preemption_mode=mode,
        max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(4, 24),
        swap_out_threshold=rng.choice([0.0, 0.3]), starvation_limit_s=0.2, max_model_len=24,
    )  # fmt: skip
    runner = ShadowRunner(sched.kv)
    stems = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 1, 2, 3, 5, 8]]
    added, aborted = [], set()
    for _ in range(3000):
        if len(added) < 24 and rng.random() < 0.5:
            stem = rng.choice(stems)
            prompt = stem[: rng.randint(1, len(stem))] + [rng.randint(0, 50)]
            r = make_request(f"r{len(added)}", prompt, rng.randint(1, 10), rng.randint(0, 2))
            added.append(r)
            sched.add_request(r)
        if sched.requests and rng.random() < 0.02:
            rid = rng.choice(sorted(sched.requests))
            sched.abort(rid)
            aborted.add(rid)
        engine_step(sched, runner)
        clock.advance(0.05)
        if len(added) == 24 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished(), "starved or livelocked"
    check_kv_invariants(sched.kv)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert sched.kv.num_free_host_blocks == sched.kv.num_host_blocks
    for r in added:
        if r.request_id not in aborted:
            assert r.status is RequestStatus.FINISHED_LENGTH
            outgrown = sched.kv.blocks_for_tokens(r.num_tokens) > sched.kv.num_blocks
            done = r.num_output_tokens == r.sampling_params.max_tokens
            assert done or r.num_tokens >= 24 or outgrown
