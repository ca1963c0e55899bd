"""The discrete-event simulator: the real scheduler on a simulated clock, checked against
hand-computed schedules."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fastserve.engine.runner import CostEstimate
from fastserve.engine.scheduler import SchedulerConfig
from fastserve.engine.simulator import (
    SimJob,
    StepCost,
    capacity_rps,
    pareto_workload,
    simulate,
    summarize,
)

COST = StepCost(fixed_s=0.010, per_seq_s=0.001, per_token_s=0.0001)


def config(policy: str, **kw) -> SchedulerConfig:
    return SchedulerConfig(policy=policy, max_model_len=4096, **kw)


def test_single_job_matches_hand_computed_steps():
    # prompt of 100 tokens in one step (budget 512), then 9 decode steps for 10 output tokens
    job = SimJob(arrival_s=1.0, prompt_len=100, output_len=10)
    res = simulate([job], config("fcfs"), COST, num_blocks=64)
    prefill = COST.step_s(1, 100)
    decode = COST.step_s(1, 1)
    assert res.ttft_s[0] == pytest.approx(prefill)
    assert res.jct_s[0] == pytest.approx(prefill + 9 * decode)
    assert res.queue_s[0] == pytest.approx(0.0)
    assert res.num_steps == 10
    assert res.makespan_s == pytest.approx(1.0 + prefill + 9 * decode)
    assert res.finish_reasons == ["length"]
    assert res.num_blocks_in_use == 0


def test_chunked_prefill_follows_the_token_budget():
    job = SimJob(0.0, prompt_len=100, output_len=1)
    res = simulate([job], config("fcfs", max_num_batched_tokens=32), COST, num_blocks=64)
    # 32 + 32 + 32 + 4 tokens: four steps, the last one samples the only output token
    expected = 3 * COST.step_s(1, 32) + COST.step_s(1, 4)
    assert res.num_steps == 4
    assert res.jct_s[0] == pytest.approx(expected)


def test_fcfs_one_slot_serves_in_arrival_order():
    jobs = [SimJob(0.0, 10, 50), SimJob(0.001, 10, 2)]
    res = simulate(jobs, config("fcfs", max_num_seqs=1), COST, num_blocks=64)
    first = COST.step_s(1, 10) + 49 * COST.step_s(1, 1)
    assert res.jct_s[0] == pytest.approx(first)
    # the short job waits for the whole long one
    assert res.jct_s[1] == pytest.approx(first - 0.001 + COST.step_s(1, 10) + COST.step_s(1, 1))


def test_mlfq_lets_a_short_job_overtake_a_long_one():
    # the long job uses up its top-queue quantum (8 decode steps, ~0.09 s) and is demoted; a
    # short job arriving after that joins the top queue and takes the only slot at once
    jobs = [SimJob(0.0, 10, 200), SimJob(0.1, 10, 2)]
    fcfs = simulate(jobs, config("fcfs", max_num_seqs=1), COST, num_blocks=64)
    mlfq = simulate(jobs, config("mlfq", max_num_seqs=1), COST, num_blocks=64)
    assert fcfs.jct_s[1] > fcfs.jct_s[0] - 0.1  # waited behind the whole long job
    short = COST.step_s(1, 10) + COST.step_s(1, 1)
    # at most the rest of the step running when it arrived, then its own two steps
    assert short <= mlfq.jct_s[1] <= short + COST.step_s(1, 1)
    # the long job pays for exactly the two steps of the short one
    assert mlfq.jct_s[0] == pytest.approx(fcfs.jct_s[0] + short, rel=1e-9)
    assert mlfq.num_blocks_in_use == fcfs.num_blocks_in_use == 0


def test_tiny_kv_pool_preempts_and_still_finishes_everything():
    jobs = pareto_workload(60, rate_rps=200.0, seed=3, prompt_len=(8, 40), max_output=60)
    for policy, mode, host in (("fcfs", "recompute", 0), ("mlfq", "swap", 16)):
        cfg = config(policy, max_num_seqs=8, preemption_mode=mode)
        res = simulate(jobs, cfg, COST, num_blocks=12, block_size=8, num_host_blocks=host)
        assert res.num_preemptions > 0
        assert all(r == "length" for r in res.finish_reasons)
        assert res.num_blocks_in_use == 0
        if mode == "swap":
            assert res.num_swapped_blocks > 0


def test_simulation_is_deterministic():
    jobs = pareto_workload(200, rate_rps=50.0, seed=1)
    a = simulate(jobs, config("mlfq", max_num_seqs=4), COST, num_blocks=512)
    b = simulate(jobs, config("mlfq", max_num_seqs=4), COST, num_blocks=512)
    assert a.jct_s == b.jct_s and a.num_steps == b.num_steps


@pytest.mark.parametrize("per_context", [0.0, 2e-5])
def test_capacity_matches_a_saturated_simulation_of_identical_jobs(per_context):
    # identical jobs, all at time 0, a multiple of the batch: the batch is always full
    cost = dataclasses.replace(COST, per_context_token_s=per_context)
    jobs = [SimJob(0.0, 16, 40) for _ in range(64)]
    cap = capacity_rps(jobs, cost, max_num_seqs=8)
    res = simulate(jobs, config("fcfs", max_num_seqs=8), cost, num_blocks=1024)
    measured = len(jobs) / res.makespan_s
    # prefill steps batch 8 prompts (8 rows of 16 tokens) and are cheaper per token than the
    # capacity assumes; the two agree within the step-fixed-cost share of a prefill
    assert measured == pytest.approx(cap, rel=0.1)


def test_step_cost_fit_recovers_known_coefficients():
    true = StepCost(fixed_s=0.003, per_seq_s=0.0002, per_token_s=0.00005, per_context_token_s=3e-7)
    est = CostEstimate(
        prefill_s_per_token=0.0,
        decode_s_per_step=0.0,
        prefill_s_by_tokens={n: true.step_s(1, n, num_context_tokens=n) for n in (32, 128, 256)},
        decode_s_by_batch={b: true.step_s(b, b, num_context_tokens=64 * b) for b in (1, 8, 32)},
        context_len=64,
        decode8_s_by_context={1024: true.step_s(8, 8, num_context_tokens=8 * 1024)},
    )
    fit = StepCost.from_estimate(est)
    for name in ("fixed_s", "per_seq_s", "per_token_s", "per_context_token_s"):
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=1e-6, abs=1e-12)


def test_context_tokens_are_charged_per_step():
    cost = StepCost(0.01, 0.001, 0.0001, per_context_token_s=1e-5)
    res = simulate([SimJob(0.0, 40, 3)], config("fcfs"), cost, num_blocks=64)
    # prefill reads 40 tokens of context, the two decodes 41 and 42
    expected = cost.step_s(1, 40, 0, 40) + cost.step_s(1, 1, 0, 41) + cost.step_s(1, 1, 0, 42)
    assert res.jct_s[0] == pytest.approx(expected)


def test_workload_rate_and_lengths():
    jobs = pareto_workload(20_000, rate_rps=40.0, seed=0, max_output=300)
    duration = jobs[-1].arrival_s
    assert len(jobs) / duration == pytest.approx(40.0, rel=0.03)
    outs = sorted(j.output_len for j in jobs)
    assert outs[0] >= 8 and outs[-1] == 300
    assert outs[len(outs) // 2] < 20  # most jobs are short
    # the same seed gives the same lengths whatever the rate
    again = pareto_workload(20_000, rate_rps=5.0, seed=0, max_output=300)
    assert [j.output_len for j in again] == [j.output_len for j in jobs]
    # burstiness < 1: same mean rate, more variable gaps
    bursty = pareto_workload(20_000, rate_rps=40.0, seed=0, burstiness=0.25)
    gaps = lambda js: [b.arrival_s - a.arrival_s for a, b in zip(js, js[1:])]
    cv = lambda g: (
        math.sqrt(sum((x - sum(g) / len(g)) ** 2 for x in g) / len(g)) / (sum(g) / len(g))
    )
    assert cv(gaps(jobs)) == pytest.approx(1.0, rel=0.05)
    assert cv(gaps(bursty)) == pytest.approx(2.0, rel=0.1)  # CV of gamma(k) = 1 / sqrt(k)


def test_summarize_and_bad_input():
    s = summarize([float(i) for i in range(1, 101)])
    assert s["mean"] == 50.5 and s["median"] == 50.5 and s["p95"] == 96.0 and s["p99"] == 100.0
    with pytest.raises(ValueError, match="jobs"):
        simulate([], config("fcfs"), COST, num_blocks=8)
    with pytest.raises(ValueError, match="per_token_s"):
        StepCost(0.0, 0.0, -1.0)
    with pytest.raises(ValueError, match="rate_rps"):
        pareto_workload(10, rate_rps=0.0)
