"""Serving over HTTP: MLFQ vs FCFS through `fastserve serve`, and the HTTP overhead.

    python benchmarks/bench_serve.py [--num-requests 300] [--load 0.85] [--max-output 2000]
                                     [--skip-overhead] [--skip-sched]

1. Scheduling: the same heavy-tailed workload as bench_sched.py (prompts of 16..128 random token
   ids, Pareto output lengths capped at --max-output, ignore_eos, Poisson arrivals at --load
   times the cost-model capacity measured in this run) is written as a jsonl dataset and sent by
   `fastserve bench serve` (fastserve.eval.loadgen, streaming) to a `fastserve serve` process
   started once with --policy fcfs and once with --policy mlfq (--max-num-seqs 8). Reports mean,
   median, p95, p99 of E2E (JCT) and TTFT as measured by the client, and mlfq / fcfs.
2. HTTP overhead: bench_engine.py's 64 mixed prompts, greedy with their output lengths, all sent
   at once (request rate inf) to the server, vs the same prompts through the offline `LLM` in
   this process: output tokens/s of each and server / offline.
Servers run with OMP_NUM_THREADS unset (all cores) unless --threads is given; the load generator
shares the machine with the server, as a client on the same host would.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench_engine import workload  # benchmarks/ is on sys.path when run as a script
from fastserve.engine import EngineConfig, LLMEngine
from fastserve.engine.simulator import StepCost, capacity_rps, pareto_workload, summarize
from fastserve.eval.loadgen import BenchConfig, run_benchmark


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, log: Path, threads: int | None, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "fastserve", "serve", str(model_dir), "--port", str(self.port)]
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*cmd, *args], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(f"server not ready; see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def make_served_dir(preset: str, root: Path) -> Path:
    """A random-init model whose tokenizer covers its whole vocabulary (trained to 4096 tokens on
    ~3 MB of the standard library), so generated ids decode to text and the client's TTFT (first
    chunk with text, vLLM's rule) is defined."""
    from fastserve.data.corpus import stdlib_files
    from fastserve.data.tokenizer import Tokenizer
    from fastserve.model import LlamaForCausalLM, ModelConfig, save_model

    texts, size = [], 0
    for f in stdlib_files():
        texts.append(f.read_text(encoding="utf-8", errors="ignore"))
        size += len(texts[-1])
        if size > 3_000_000:
            break
    tokenizer = Tokenizer.train(texts, vocab_size=4096)
    config = ModelConfig.preset(
        preset, vocab_size=tokenizer.vocab_size, max_position_embeddings=4096
    )
    path = root / preset
    save_model(LlamaForCausalLM(config), path, tokenizer=tokenizer)
    return path


def write_dataset(path: Path, prompts: list[list[int]], output_lens: list[int]) -> None:
    with open(path, "w") as f:
        for p, n in zip(prompts, output_lens):
            f.write(json.dumps({"prompt": p, "output_len": n}) + "\n")


def bench(url: str, dataset: Path, n: int, rate: float, seed: int) -> dict:
    config = BenchConfig(
        url=url,
        dataset=str(dataset),
        num_prompts=n,
        request_rate=rate,
        seed=seed,
        ignore_eos=True,
        progress=False,
    )
    return run_benchmark(config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--load", type=float, default=0.85)
    ap.add_argument("--rate", type=float, default=None, help="req/s (overrides --load)")
    ap.add_argument("--max-output", type=int, default=2000)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the servers")
    ap.add_argument("--skip-sched", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "serve"))
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = make_served_dir(args.preset, tmp)
        if not args.skip_sched:
            probe = LLMEngine.from_model_dir(str(path), EngineConfig(policy="fcfs"))
            cost = StepCost.from_estimate(probe.runner.profile(long_context_len=1024))
            del probe
            base = pareto_workload(args.num_requests, None, args.seed, max_output=args.max_output)
            cap = capacity_rps(base, cost, args.max_num_seqs)
            rate = args.rate or args.load * cap
            import random

            rng = random.Random(args.seed)
            prompts = [[rng.randrange(3, 4096) for _ in range(j.prompt_len)] for j in base]
            dataset = tmp / "sched.jsonl"
            write_dataset(dataset, prompts, [j.output_len for j in base])
            results = {}
            for policy in ("fcfs", "mlfq"):
                server = Server(
                    path,
                    out / f"server-{policy}.log",
                    args.threads,
                    "--policy",
                    policy,
                    "--max-num-seqs",
                    str(args.max_num_seqs),
                )
                try:
                    results[policy] = bench(server.url, dataset, args.num_requests, rate, args.seed)
                finally:
                    server.stop()
                assert results[policy]["failed"] == 0, results[policy].get("errors")
            table = Table(
                title=f"HTTP, {args.num_requests} requests at {rate:.2f} req/s (load "
                f"{rate / cap:.2f} of {cap:.2f}), outputs capped at {args.max_output}, "
                f"max_num_seqs {args.max_num_seqs}"
            )
            for col in ("metric", "fcfs", "mlfq", "mlfq / fcfs"):
                table.add_column(col, justify="right")
            report["sched"] = {"rate_rps": rate, "capacity_rps": cap}
            for key, name in (("e2els", "JCT"), ("ttfts", "TTFT")):
                values = {p: [v for v in results[p][key] if v is not None] for p in results}
                missing = {p: len(results[p][key]) - len(v) for p, v in values.items()}
                if any(missing.values()):  # a reply whose text stayed empty has no TTFT
                    console.print(f"[yellow]{name}: requests without a value {missing}[/yellow]")
                s = {p: summarize(v) for p, v in values.items()}
                report["sched"][name] = s
                for stat in ("mean", "median", "p95", "p99"):
                    f, m = s["fcfs"][stat], s["mlfq"][stat]
                    table.add_row(f"{name} {stat} (s)", f"{f:.3f}", f"{m:.3f}", f"{m / f:.2f}x")
            console.print(table)

        if not args.skip_overhead:
            from fastserve import LLM, SamplingParams

            work = workload(64, 4096)
            dataset = tmp / "overhead.jsonl"
            write_dataset(dataset, [p for p, _ in work], [m for _, m in work])
            wanted = sum(m for _, m in work)
            llm = LLM(str(path))
            params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, m in work]
            offline = []
            for _ in range(3):
                t0 = time.perf_counter()
                outs = llm.generate([p for p, _ in work], params, use_tqdm=False)
                offline.append(wanted / (time.perf_counter() - t0))
                assert sum(len(o.outputs[0].token_ids) for o in outs) == wanted
            del llm
            server = Server(path, out / "server-overhead.log", args.threads)
            try:
                online = []
                for i in range(3):
                    r = bench(server.url, dataset, len(work), float("inf"), i)
                    assert r["failed"] == 0 and r["total_output_tokens"] == wanted
                    online.append(r["output_throughput"])
            finally:
                server.stop()
            off, on = sorted(offline)[1], sorted(online)[1]
            report["overhead"] = {"offline_tok_s": offline, "server_tok_s": online}
            console.print(
                f"64 prompts at once: offline LLM {off:.0f} output tok/s, server {on:.0f} "
                f"(server / offline {on / off:.2f}x; medians of 3: {offline} {online})"
            )
    (out / "results.json").write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
