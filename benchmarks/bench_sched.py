"""Scheduling: job completion time (JCT) and TTFT of skip-join MLFQ vs FCFS on the real engine.

    python benchmarks/bench_sched.py [--num-requests 500] [--load 0.85 | --rate R]
                                     [--max-output 2000] [--max-num-seqs 8] [--seed 0]

Workload (fastserve.engine.simulator.pareto_workload, the same for both policies): prompts of
random token ids, lengths uniform in 16..128; output lengths Pareto (shape 1.1, scale 8) capped at
--max-output (2000: ShareGPT-like, most answers short and a few very long); ignore_eos, so each
job produces exactly its length; Poisson arrivals (gamma with --burstiness). The arrival rate is
--rate, or --load times the full-batch capacity that the engine's profiled cost model gives
(`simulator.capacity_rps`): no noisy capacity run, so both policies and repeated runs see the same
rate. Both policies run the real engine in real time with the same `max_num_seqs` (the batch
limit that makes jobs wait, as GPU memory does in the FastServe paper). JCT = finish - arrival,
TTFT = first token - arrival. Next to the measured figures the table shows what the
discrete-event simulator predicts for the same jobs and arrivals with the same cost model.
Writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_engine import make_model_dir  # benchmarks/ is on sys.path when run as a script
from fastserve.engine import EngineConfig, LLMEngine, SamplingParams
from fastserve.engine.simulator import (
    SimJob,
    StepCost,
    capacity_rps,
    pareto_workload,
    simulate,
    summarize,
)


def run_online(
    path: Path, jobs: list[SimJob], vocab: int, policy: str, max_num_seqs: int, starvation_s: float
) -> dict:
    import random

    config = EngineConfig(policy=policy, max_num_seqs=max_num_seqs, starvation_limit_s=starvation_s)
    engine = LLMEngine.from_model_dir(str(path), config)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(j.prompt_len)] for j in jobs]
    t0 = time.monotonic()
    next_job, jct, ttft = 0, {}, {}
    while next_job < len(jobs) or engine.has_unfinished_requests():
        now = time.monotonic() - t0
        while next_job < len(jobs) and jobs[next_job].arrival_s <= now:
            job = jobs[next_job]
            params = SamplingParams(max_tokens=job.output_len, temperature=0, ignore_eos=True)
            engine.add_request(
                f"j{next_job}", prompts[next_job], params, arrival_time=t0 + job.arrival_s
            )
            next_job += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, jobs[next_job].arrival_s - (time.monotonic() - t0)))
            continue
        for out in engine.step():
            if out.finished:
                m = out.metrics
                jct[out.request_id] = m.e2e_s
                ttft[out.request_id] = m.ttft_s
    return {
        "jct": list(jct.values()),
        "ttft": list(ttft.values()),
        "makespan_s": time.monotonic() - t0,
        "preemptions": engine.stats().num_preemptions,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--num-requests", type=int, default=500)
    ap.add_argument("--load", type=float, default=0.85, help="arrival rate / capacity (0.85)")
    ap.add_argument("--rate", type=float, default=None, help="arrival rate in req/s (overrides)")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson)")
    ap.add_argument("--max-output", type=int, default=2000, help="output length cap (2000)")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--starvation-limit-s",
        type=float,
        default=5.0,
        help="MLFQ: promote a request to the top queue after waiting this long (5.0)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "sched"))
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    vocab = 4096
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir(args.preset, Path(tmp), max_position_embeddings=4096)
        probe = LLMEngine.from_model_dir(str(path), EngineConfig(policy="fcfs"))
        cost = StepCost.from_estimate(probe.runner.profile(long_context_len=1024))
        num_blocks, num_host_blocks = probe.kv.num_blocks, probe.kv.num_host_blocks
        del probe
        base = pareto_workload(args.num_requests, None, args.seed, max_output=args.max_output)
        cap = capacity_rps(base, cost, args.max_num_seqs)
        rate = args.rate or args.load * cap
        jobs = pareto_workload(
            args.num_requests, rate, args.seed, max_output=args.max_output,
            burstiness=args.burstiness,
        )  # fmt: skip
        results = {
            policy: run_online(
                path, jobs, vocab, policy, args.max_num_seqs, args.starvation_limit_s
            )
            for policy in ("fcfs", "mlfq")
        }
    sims = {
        policy: simulate(
            jobs,
            EngineConfig(
                policy=policy,
                max_num_seqs=args.max_num_seqs,
                starvation_limit_s=args.starvation_limit_s,
            ).scheduler_config(4096, swap=num_host_blocks > 0),
            cost,
            num_blocks=num_blocks,
            num_host_blocks=num_host_blocks,
        )
        for policy in ("fcfs", "mlfq")
    }
    lengths = sorted(j.output_len for j in jobs)
    print(
        f"cost model {cost.fixed_s * 1e3:.2f} ms + {cost.per_seq_s * 1e6:.0f} us/seq + "
        f"{cost.per_token_s * 1e6:.0f} us/token + {cost.per_context_token_s * 1e9:.0f} ns/context "
        f"token; capacity {cap:.2f} req/s; arrival rate "
        f"{rate:.2f} req/s (load {rate / cap:.2f}); output lengths median "
        f"{lengths[len(lengths) // 2]}, p95 {lengths[int(0.95 * len(lengths))]}, max {lengths[-1]}"
    )
    table = Table(
        title=f"{args.num_requests} requests, max_num_seqs {args.max_num_seqs} ({args.preset}); "
        "measured, and the simulator's prediction"
    )
    for col in ("metric", "fcfs", "mlfq", "mlfq / fcfs", "sim fcfs", "sim mlfq", "sim ratio"):
        table.add_column(col, justify="right")
    report = {"capacity_rps": cap, "rate_rps": rate, "cost": cost.__dict__, "args": vars(args)}
    for metric in ("jct", "ttft"):
        s = {p: summarize(results[p][metric]) for p in results}
        sim = {p: r.summary(f"{metric}_s") for p, r in sims.items()}
        report[metric] = s
        report[f"sim_{metric}"] = sim
        for stat in ("mean", "median", "p95", "p99"):
            f, m = s["fcfs"][stat], s["mlfq"][stat]
            sf, sm = sim["fcfs"][stat], sim["mlfq"][stat]
            table.add_row(
                f"{metric} {stat} (s)",
                f"{f:.3f}",
                f"{m:.3f}",
                f"{m / f:.2f}x",
                f"{sf:.3f}",
                f"{sm:.3f}",
                f"{sm / sf:.2f}x",
            )
    for p in results:
        report[f"{p}_makespan_s"] = results[p]["makespan_s"]
        report[f"{p}_preemptions"] = results[p]["preemptions"]
    Console().print(table)
    print(
        "makespan (s): "
        + ", ".join(
            f"{p} {results[p]['makespan_s']:.1f} (sim {sims[p].makespan_s:.1f})" for p in sims
        )
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
