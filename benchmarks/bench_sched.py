"""Scheduling: job completion time (JCT) and TTFT of skip-join MLFQ vs FCFS on the real engine.

    python benchmarks/bench_sched.py [--num-requests 200] [--load 0.85] [--max-num-seqs 8]

Workload (the same for both policies, fixed seed): Poisson arrivals; prompt lengths uniform in
16..128 tokens; output lengths heavy-tailed (Pareto, shape 1.1, scale 8, capped at 300 tokens:
most jobs are short, a few are very long), ignore_eos so each job produces exactly its length.
The arrival rate is --load times the capacity measured first in the same run (all requests
submitted at once under fcfs: requests completed per second). Both policies run the engine in real
time with the same `max_num_seqs` (the batch limit that makes jobs wait, as GPU memory does in
the FastServe paper). JCT = finish - arrival; TTFT = first token - arrival. Prints mean, median and
p95 of both and the mlfq / fcfs ratios, and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench_engine import make_model_dir  # benchmarks/ is on sys.path when run as a script
from fastserve.engine import EngineConfig, LLMEngine, SamplingParams


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(16, 128))]
        output = min(300, int(8 * rng.paretovariate(1.1)))
        jobs.append((prompt, output))
    return jobs


def capacity_rps(path: Path, jobs, max_num_seqs: int) -> float:
    engine = LLMEngine.from_model_dir(
        str(path), EngineConfig(policy="fcfs", max_num_seqs=max_num_seqs)
    )
    for i, (prompt, out) in enumerate(jobs):
        engine.add_request(f"c{i}", prompt, SamplingParams(max_tokens=out, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return len(jobs) / (time.perf_counter() - t0)


def run_online(
    path: Path, jobs, arrivals: list[float], policy: str, max_num_seqs: int, starvation_s: float
) -> dict:
    config = EngineConfig(policy=policy, max_num_seqs=max_num_seqs, starvation_limit_s=starvation_s)
    engine = LLMEngine.from_model_dir(str(path), config)
    t0 = time.monotonic()
    next_job, jct, ttft = 0, {}, {}
    while next_job < len(jobs) or engine.has_unfinished_requests():
        now = time.monotonic() - t0
        while next_job < len(jobs) and arrivals[next_job] <= now:
            prompt, out = jobs[next_job]
            params = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
            engine.add_request(f"j{next_job}", prompt, params, arrival_time=t0 + arrivals[next_job])
            next_job += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[next_job] - (time.monotonic() - t0)))
            continue
        for out in engine.step():
            if out.finished:
                m = out.metrics
                jct[out.request_id] = m.e2e_s
                ttft[out.request_id] = m.ttft_s
    return {"jct": jct, "ttft": ttft, "makespan_s": time.monotonic() - t0}


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p95": values[min(len(values) - 1, int(0.95 * len(values)))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--load", type=float, default=0.85, help="arrival rate / measured capacity")
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

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir(args.preset, Path(tmp))
        jobs = workload(args.num_requests, 4096, args.seed)
        cap = capacity_rps(path, jobs, args.max_num_seqs)
        rate = args.load * cap
        rng = random.Random(args.seed + 1)
        arrivals, t = [], 0.0
        for _ in jobs:
            t += rng.expovariate(rate)
            arrivals.append(t)
        results = {
            policy: run_online(
                path, jobs, arrivals, policy, args.max_num_seqs, args.starvation_limit_s
            )
            for policy in ("fcfs", "mlfq")
        }
    lengths = sorted(o for _, o in jobs)
    print(
        f"capacity {cap:.2f} req/s, arrival rate {rate:.2f} req/s; output lengths "
        f"median {statistics.median(lengths)}, p95 {lengths[int(0.95 * len(lengths))]}, "
        f"max {lengths[-1]}"
    )
    table = Table(
        title=f"{args.num_requests} requests, load {args.load}, max_num_seqs "
        f"{args.max_num_seqs} ({args.preset})"
    )
    for col in ("metric", "fcfs", "mlfq", "mlfq / fcfs"):
        table.add_column(col, justify="right")
    report = {"capacity_rps": cap, "rate_rps": rate, "args": vars(args)}
    for metric in ("jct", "ttft"):
        s = {p: summary(list(results[p][metric].values())) for p in results}
        report[metric] = s
        for stat in ("mean", "median", "p95"):
            f, m = s["fcfs"][stat], s["mlfq"][stat]
            table.add_row(f"{metric} {stat} (s)", f"{f:.3f}", f"{m:.3f}", f"{m / f:.2f}x")
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
