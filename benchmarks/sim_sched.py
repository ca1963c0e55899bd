"""Scheduling at scale: skip-join MLFQ vs FCFS in the discrete-event simulator (10k requests).

    python benchmarks/sim_sched.py [--num-requests 10000] [--loads 0.5,0.7,0.8,0.85,0.9,0.95]
                                   [--cost cost.json | --preset small] [--max-num-seqs 8]

The simulator (fastserve.engine.simulator) runs the engine's own scheduler and KV-cache manager on
a simulated clock; each step costs what the cost model fitted to this machine's profile of the
model says (`StepCost.from_estimate(runner.profile(long_context_len=1024))`, or a JSON file with
the StepCost fields). Two workloads, the same for both policies: prompts uniform in 16..128 tokens,
outputs Pareto (shape 1.1, scale 8) capped at 300 tokens ("short tail") or at 2000 tokens ("long
tail", ShareGPT-like: most answers short, a few very long); Poisson arrivals (or gamma with
--burstiness) at each load = arrival rate / full-batch capacity (`simulator.capacity_rps`).
Prints mean / p95 / p99 JCT and mean TTFT of both policies and the mlfq / fcfs ratios, and writes
results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from fastserve.engine.scheduler import SchedulerConfig
from fastserve.engine.simulator import StepCost, capacity_rps, pareto_workload, simulate

WORKLOADS = {"short tail (cap 300)": 300, "long tail (cap 2000)": 2000}


def profiled_cost(preset: str) -> StepCost:
    from bench_engine import make_model_dir  # benchmarks/ is on sys.path when run as a script
    from fastserve.engine import EngineConfig, LLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model_dir(preset, Path(tmp))
        engine = LLMEngine.from_model_dir(str(path), EngineConfig(policy="fcfs"))
        return StepCost.from_estimate(engine.runner.profile(long_context_len=1024))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--loads", default="0.5,0.7,0.8,0.85,0.9,0.95", help="comma-separated loads")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--num-kv-blocks", type=int, default=16384, help="device KV blocks of 16")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cost", default=None, help="StepCost JSON (default: profile --preset)")
    ap.add_argument("--preset", default="small", help="model preset to profile (small)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "sim_sched"))
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.cost:
        cost = StepCost(**json.loads(Path(args.cost).read_text()))
    else:
        cost = profiled_cost(args.preset)
    console.print(
        f"step cost: {cost.fixed_s * 1e3:.3f} ms + {cost.per_seq_s * 1e6:.1f} us/seq + "
        f"{cost.per_token_s * 1e6:.1f} us/token + {cost.per_context_token_s * 1e9:.0f} ns/context "
        "token"
    )
    loads = [float(x) for x in args.loads.split(",")]
    report = {"cost": asdict(cost), "args": vars(args), "results": []}
    for name, cap_out in WORKLOADS.items():
        base = pareto_workload(args.num_requests, None, args.seed, max_output=cap_out)
        cap = capacity_rps(base, cost, args.max_num_seqs)
        table = Table(
            title=f"{name}: {args.num_requests} requests, max_num_seqs {args.max_num_seqs}, "
            f"capacity {cap:.1f} req/s"
        )
        for col in ("load", "fcfs mean", "mlfq mean", "mean ratio", "fcfs p95", "mlfq p95",
                    "p95 ratio", "p99 ratio", "TTFT mean ratio", "sim s"):  # fmt: skip
            table.add_column(col, justify="right")
        for load in loads:
            jobs = pareto_workload(
                args.num_requests,
                load * cap,
                args.seed,
                max_output=cap_out,
                burstiness=args.burstiness,
            )
            t0 = time.perf_counter()
            runs = {
                policy: simulate(
                    jobs,
                    SchedulerConfig(
                        policy=policy, max_num_seqs=args.max_num_seqs, max_model_len=4096
                    ),
                    cost,
                    num_blocks=args.num_kv_blocks,
                )
                for policy in ("fcfs", "mlfq")
            }
            elapsed = time.perf_counter() - t0
            jct = {p: r.summary("jct_s") for p, r in runs.items()}
            ttft = {p: r.summary("ttft_s") for p, r in runs.items()}
            f, m = jct["fcfs"], jct["mlfq"]
            table.add_row(
                f"{load:.2f}",
                f"{f['mean']:.3f}",
                f"{m['mean']:.3f}",
                f"{m['mean'] / f['mean']:.2f}x",
                f"{f['p95']:.3f}",
                f"{m['p95']:.3f}",
                f"{m['p95'] / f['p95']:.2f}x",
                f"{m['p99'] / f['p99']:.2f}x",
                f"{ttft['mlfq']['mean'] / ttft['fcfs']['mean']:.2f}x",
                f"{elapsed:.1f}",
            )
            report["results"].append(
                {"workload": name, "load": load, "capacity_rps": cap, "jct": jct, "ttft": ttft}
            )
        console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
