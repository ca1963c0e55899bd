"""Discrete-event simulation of the engine's scheduler: the real `Scheduler` and `KVCacheManager`
driven by a simulated clock, with step times from a cost model instead of a model.

    cost = StepCost.from_estimate(runner.profile(long_context_len=1024))  # or StepCost(...)
    jobs = [SimJob(arrival_s=0.1 * i, prompt_len=64, output_len=20) for i in range(10_000)]
    result = simulate(jobs, SchedulerConfig(policy="mlfq", max_num_seqs=8), cost, num_blocks=4096)
    result.jct_s            # per job, in job order
    result.makespan_s, result.num_preemptions, result.num_steps

Each iteration is what `LLMEngine.step()` does, minus tensors: `Scheduler.schedule()` picks the
requests and token counts (and swaps), the clock advances by the step's estimated time
(`StepCost.step_s`, plus swap copies), `update_after_step()` charges MLFQ quanta, and every request
whose scheduled tokens reach its end "samples" one token. A job finishes after exactly
`output_len` tokens (ignore_eos). Jobs arrive at their `arrival_s`; an idle engine jumps ahead to
the next arrival. Prefix caching is off by default and prompts are distinct, so a simulated
request never hits the cache unless the caller makes prompts share prefixes.

Because the scheduler, the policies and the KV accounting are the engine's own code, the
simulation shows what the policy does at scales (10k requests) and loads that are too slow to run
on the real model, and it is deterministic: two policies see exactly the same arrivals and costs.

What it does not know: tensors, tokens' values, sampling, detokenization, wall-clock time.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from dataclasses import dataclass, field

from fastserve.engine.kv_cache import KVCacheManager
from fastserve.engine.request import Request, RequestStatus, SamplingParams
from fastserve.engine.scheduler import CostModel, Scheduler, SchedulerConfig


@dataclass(frozen=True)
class StepCost:
    """Estimated seconds of one engine step:
    fixed + per_seq * rows + per_token * tokens + per_context_token * context tokens + swaps,
    where the context tokens are each scheduled request's sequence length after the step (what
    its attention reads)."""

    # Per step, whatever runs (launch and Python overheads, weights read once per step).
    fixed_s: float
    # Per scheduled request (sampling, per-row attention set-up).
    per_seq_s: float
    # Per computed token (the matmuls of prefill chunks and decodes).
    per_token_s: float
    # Per context token attended to (reading its K/V).
    per_context_token_s: float = 0.0
    # Per KV block copied between the device pool and the host tier.
    per_swap_block_s: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) >= 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)!r}")

    def step_s(
        self,
        num_seqs: int,
        num_tokens: int,
        num_swap_blocks: int = 0,
        num_context_tokens: int = 0,
    ) -> float:
        if num_seqs == 0 and num_swap_blocks == 0:
            return 0.0
        return (
            self.fixed_s
            + self.per_seq_s * num_seqs
            + self.per_token_s * num_tokens
            + self.per_context_token_s * num_context_tokens
            + self.per_swap_block_s * num_swap_blocks
        )

    def cost_model(self) -> CostModel:
        """The scheduler's view (MLFQ skip-join and quanta): per prompt token, per decode step."""
        return CostModel(self.per_token_s, self.step_s(1, 1))

    @classmethod
    def from_estimate(cls, estimate, per_swap_block_s: float = 0.0) -> StepCost:
        """Least-squares fit of (1, rows, tokens, context tokens) to a runner's `CostEstimate`:
        single-request prefills of several sizes (context = the prompt), decode steps of several
        batch sizes at one context length, and 8 decodes over long contexts (profile with
        `long_context_len`; without them the context cost cannot be told apart from the rest
        and is left at 0). Negative coefficients (noise) are clipped to 0."""
        import torch

        rows, times = [], []
        for n, t in estimate.prefill_s_by_tokens.items():
            rows.append([1.0, 1.0, float(n), float(n)])
            times.append(t)
        ctx = getattr(estimate, "context_len", 64)
        for b, t in estimate.decode_s_by_batch.items():
            rows.append([1.0, float(b), float(b), float(b * ctx)])
            times.append(t)
        for c, t in getattr(estimate, "decode8_s_by_context", {}).items():
            rows.append([1.0, 8.0, 8.0, float(8 * c)])
            times.append(t)
        a = torch.tensor(rows, dtype=torch.float64)
        if not getattr(estimate, "decode8_s_by_context", None):
            a = a[:, :3]  # no context-length variation: fit without that term
        y = torch.tensor(times, dtype=torch.float64).unsqueeze(1)
        coef = torch.linalg.lstsq(a, y).solution.squeeze(1).clamp_min(0).tolist()
        coef += [0.0] * (4 - len(coef))
        return cls(coef[0], coef[1], coef[2], coef[3], per_swap_block_s)


@dataclass(frozen=True)
class SimJob:
    arrival_s: float
    prompt_len: int
    output_len: int
    priority: int = 0


@dataclass
class SimResult:
    # Per job, in the order of the jobs given (None for a job the scheduler rejected).
    jct_s: list[float | None]
    ttft_s: list[float | None]
    queue_s: list[float | None]
    makespan_s: float
    num_steps: int
    num_preemptions: int
    num_swapped_blocks: int  # blocks copied in either direction
    num_blocks_in_use: int  # device + host KV blocks still held after the last job (0 expected)
    finish_reasons: list[str | None] = field(default_factory=list)

    def summary(self, metric: str = "jct_s") -> dict[str, float]:
        """mean, median, p95, p99 of a per-job metric (rejected jobs left out)."""
        return summarize([v for v in getattr(self, metric) if v is not None])


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        raise ValueError("no values to summarize")
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]
    return {
        "mean": statistics.fmean(s),
        "median": statistics.median(s),
        "p95": pick(0.95),
        "p99": pick(0.99),
    }


def simulate(
    jobs: list[SimJob],
    config: SchedulerConfig,
    cost: StepCost,
    num_blocks: int,
    block_size: int = 16,
    num_host_blocks: int = 0,
    enable_prefix_caching: bool = False,
    max_steps: int | None = None,
) -> SimResult:
    """Run `jobs` through the scheduler on a simulated clock (see the module docstring)."""
    if not jobs:
        raise ValueError("jobs must not be empty")
    if num_host_blocks == 0 and config.preemption_mode == "swap":
        config = SchedulerConfig(**{**config.__dict__, "preemption_mode": "recompute"})
    clock = [0.0]
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching, num_host_blocks)
    sched = Scheduler(config, kv, cost.cost_model(), clock=lambda: clock[0])
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].arrival_s)
    requests: list[Request | None] = [None] * len(jobs)
    targets: dict[str, int] = {}
    params = SamplingParams(max_tokens=None, ignore_eos=True)
    token = 3  # distinct token ids per prompt: no accidental prefix sharing
    next_job, steps, swapped_blocks = 0, 0, 0
    while next_job < len(order) or sched.has_unfinished():
        while next_job < len(order) and jobs[order[next_job]].arrival_s <= clock[0]:
            i = order[next_job]
            job = jobs[i]
            ids = list(range(token, token + job.prompt_len))
            token += job.prompt_len
            r = Request(
                f"j{i}",
                ids,
                params,
                eos_token_id=None,
                arrival_time=job.arrival_s,
                priority=job.priority,
            )
            requests[i] = r
            targets[r.request_id] = job.output_len
            sched.add_request(r)
            next_job += 1
        if not sched.has_unfinished():
            clock[0] = max(clock[0], jobs[order[next_job]].arrival_s)
            continue
        out = sched.schedule()
        swaps = len(out.swap_in) + len(out.swap_out)
        swapped_blocks += swaps
        context = sum(
            sched.requests[s.request_id].num_computed_tokens + s.num_new_tokens
            for s in out.scheduled
        )
        dt = cost.step_s(len(out.scheduled), out.num_batched_tokens, swaps, context)
        if dt == 0.0:
            if out.finished:  # the scheduler only finished requests (too long to ever fit)
                continue
            # nothing could run (e.g. all waiting on memory): wait for an arrival
            if next_job >= len(order):
                raise RuntimeError("simulation stalled: requests remain but none can be scheduled")
            clock[0] = jobs[order[next_job]].arrival_s
            continue
        for s in out.scheduled:  # queue time ends when a request first computes tokens
            metrics = sched.requests[s.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = clock[0]
        clock[0] += dt
        now = clock[0]
        steps += 1
        if max_steps is not None and steps > max_steps:
            raise RuntimeError(f"simulation did not finish within {max_steps} steps")
        sched.update_after_step(out)
        for s in out.scheduled:
            if not s.is_prefill_chunk_final:
                continue
            r = sched.requests.get(s.request_id)
            if r is None:
                continue
            r.append_output_token(0, now)
            if r.num_output_tokens >= targets[r.request_id]:
                r.finish(RequestStatus.FINISHED_LENGTH, now=now)
                sched.finish(r.request_id, r.status)
    done = [r for r in requests if r is not None]
    return SimResult(
        jct_s=[r.metrics.e2e_s for r in requests],
        ttft_s=[r.metrics.ttft_s for r in requests],
        queue_s=[r.metrics.queue_s for r in requests],
        makespan_s=max(r.metrics.finished_time or 0.0 for r in done),
        num_steps=steps,
        num_preemptions=sched.num_preemptions,
        num_swapped_blocks=swapped_blocks,
        num_blocks_in_use=(num_blocks - kv.num_free_blocks)
        + (num_host_blocks - kv.num_free_host_blocks),
        finish_reasons=[r.finish_reason for r in requests],
    )


def pareto_workload(
    num_jobs: int,
    rate_rps: float | None,
    seed: int = 0,
    prompt_len: tuple[int, int] = (16, 128),
    pareto_shape: float = 1.1,
    pareto_scale: float = 8.0,
    max_output: int = 300,
    burstiness: float = 1.0,
) -> list[SimJob]:
    """Uniform prompt lengths, heavy-tailed outputs (Pareto, capped), arrivals with gamma
    inter-arrival times of mean 1 / rate (burstiness 1 = Poisson; < 1 burstier); rate None =
    everything at time 0. The same (seed, num_jobs) gives the same lengths whatever the rate."""
    if num_jobs < 1:
        raise ValueError(f"num_jobs must be >= 1, got {num_jobs}")
    if rate_rps is not None and not rate_rps > 0:
        raise ValueError(f"rate_rps must be > 0, got {rate_rps}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = random.Random(seed)
    lengths = [
        (
            rng.randint(*prompt_len),
            min(max_output, int(pareto_scale * rng.paretovariate(pareto_shape))),
        )
        for _ in range(num_jobs)
    ]
    arrival_rng = random.Random(seed + 1)
    t, jobs = 0.0, []
    for p, o in lengths:
        if rate_rps is not None:
            t += arrival_rng.gammavariate(burstiness, 1.0 / (rate_rps * burstiness))
        jobs.append(SimJob(t, p, max(1, o)))
    return jobs


def capacity_rps(jobs: list[SimJob], cost: StepCost, max_num_seqs: int) -> float:
    """Requests per second the engine sustains with a full batch: 1 / (mean cost of a job).
    A job costs its prompt's tokens (and their attention), plus each output token at a
    1/max_num_seqs share of a full decode step and the attention over its context so far.
    Load = arrival rate / this (a lower batch only lowers the capacity)."""
    if not jobs:
        raise ValueError("jobs must not be empty")
    b = max_num_seqs
    per_output = cost.step_s(b, b) / b
    c = cost.per_context_token_s

    def job_cost(j: SimJob) -> float:
        p, n = j.prompt_len, j.output_len
        # decode i (1..n-1) attends to p + i tokens; the prefill to p
        attention = c * (p + (n - 1) * p + (n - 1) * n / 2)
        return p * cost.per_token_s + n * per_output + attention

    return 1.0 / statistics.fmean(job_cost(j) for j in jobs)
