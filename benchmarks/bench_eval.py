"""PIQA with `fastserve eval` vs lm-evaluation-harness 0.4.x (`hf` backend), same model dir, same
machine, same run: equal acc / acc_norm, and the time ratio.

    python benchmarks/bench_eval.py --model runs/small/model \\
        --lm-eval-python /tmp/lmeval-venv/bin/python [--task-data ../shared/data] \\
        [--limit N] [--device cpu] [--lm-eval-batch-size 32] [--out benchmarks/out/eval]

lm-eval runs from its own interpreter (a separate venv: it must not share the project's), on a
task YAML written here that is lm-eval's `piqa` task (the same doc_to_text, doc_to_choice,
doc_to_target and metrics) over the local copy of the validation split (goal, sol1, sol2 and the
label of valid-labels.lst, as one jsonl), offline. Both sides are timed end to end as processes
(start, model load, scoring, results); the scoring times are also given (fastserve's task
time_s, lm-eval's total_evaluation_time_seconds, which includes its model load). With
--log-samples lm-eval writes per-choice log-likelihoods too, and the largest difference from
FastServe's (computed again through the Python API) is printed. Writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = "piqa_local"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_lm_eval_task(task_data: Path, out: Path) -> Path:
    """The task dir for lm-eval's --include_path: piqa's YAML over a local jsonl."""
    rows = (task_data / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    labels = (task_data / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").split()
    tasks = out / "lm_eval_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = tasks / "piqa_validation.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for row, label in zip(rows, labels, strict=True):
            f.write(json.dumps({**json.loads(row), "label": int(label)}) + "\n")
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data), encoding="utf-8")
    return tasks


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run a command (its output to `log`); its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} ... exited with {proc.returncode}; see {log}")
    return elapsed


def run_fastserve(args, out: Path) -> dict:
    results = out / "fastserve.json"
    cmd = [sys.executable, "-m", "fastserve", "eval", str(args.model), "--tasks", "piqa"]
    cmd += ["--task-data", str(args.task_data), "--device", args.device, "--output", str(results)]
    cmd += [] if args.limit is None else ["--limit", str(args.limit)]
    wall = run(cmd, out / "fastserve.log")
    task = json.loads(results.read_text())["tasks"][0]
    return {"wall_s": wall, "scoring_s": task["time_s"], **task["metrics"]}


def run_lm_eval(args, out: Path) -> dict:
    tasks = write_lm_eval_task(args.task_data, out)
    model_args = f"pretrained={Path(args.model).resolve()},dtype=float32"
    cmd = [args.lm_eval_python, "-m", "lm_eval", "--model", "hf", "--model_args", model_args]
    cmd += ["--tasks", TASK, "--include_path", str(tasks), "--device", args.device]
    cmd += ["--batch_size", str(args.lm_eval_batch_size), "--output_path", str(out / "lm_eval")]
    cmd += [] if args.limit is None else ["--limit", str(args.limit)]
    cmd += ["--log_samples"] if args.log_samples else []
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    wall = run(cmd, out / "lm_eval.log", env)
    path = max((out / "lm_eval").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    res = json.loads(path.read_text())
    r = res["results"][TASK]
    return {
        "wall_s": wall,
        "scoring_s": float(res.get("total_evaluation_time_seconds", "nan")),
        "acc": r["acc,none"],
        "acc_stderr": r["acc_stderr,none"],
        "acc_norm": r["acc_norm,none"],
        "acc_norm_stderr": r["acc_norm_stderr,none"],
        "version": res.get("lm_eval_version") or res.get("config", {}).get("lm_eval_version"),
        "samples": str(next((out / "lm_eval").rglob(f"samples_{TASK}_*.jsonl"), "")) or None,
    }


def max_ll_difference(args, samples: Path) -> float:
    """Largest |ll_fastserve - ll_lm_eval| over all choices of the docs lm-eval logged."""
    from fastserve.data.tokenizer import Tokenizer
    from fastserve.eval.evaluator import task_engine
    from fastserve.eval.loglikelihood import EngineScorer, encode_requests, prefix_token_id
    from fastserve.eval.tasks import load_task
    from fastserve.model import load_model

    logged = [json.loads(line) for line in samples.read_text().splitlines()]
    task = load_task("piqa", args.task_data)
    tok = Tokenizer.load(args.model)
    model = load_model(args.model, device=args.device)
    docs = encode_requests(
        task.requests(len(logged)), tok.encode_batch, prefix_token_id(tok),
        model.config.max_position_embeddings,
    )  # fmt: skip
    ours = EngineScorer(task_engine(model, tok, 2048, "1GiB")).score(docs)
    worst = 0.0
    for s in logged:
        theirs = [float(r[0][0]) for r in s["resps"]]
        mine = [r.logprob for r in ours[s["doc_id"]]]
        worst = max(worst, *(abs(a - b) for a, b in zip(mine, theirs, strict=True)))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model dir (HF format)")
    p.add_argument("--lm-eval-python", required=True, help="python of a venv with lm-eval 0.4.x")
    p.add_argument("--task-data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--limit", type=int, default=None, help="docs (default: all 1,838)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lm-eval-batch-size", default="32")
    p.add_argument("--log-samples", action="store_true", help="compare per-choice log-likelihoods")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "eval")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    fs = run_fastserve(args, args.out)
    lm = run_lm_eval(args, args.out)
    diff = None
    if args.log_samples and lm["samples"]:
        diff = max_ll_difference(args, Path(lm["samples"]))
    summary = {
        "model": str(Path(args.model).resolve()),
        "device": args.device,
        "limit": args.limit,
        "fastserve": fs,
        "lm_eval": lm,
        "equal_acc": fs["acc"] == lm["acc"],
        "equal_acc_norm": fs["acc_norm"] == lm["acc_norm"],
        "max_ll_difference": diff,
        "wall_ratio": lm["wall_s"] / fs["wall_s"],
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"{'':12} {'acc':>8} {'acc_norm':>9} {'wall s':>8} {'scoring s':>10}")
    for name, r in (("fastserve", fs), ("lm-eval", lm)):
        print(
            f"{name:12} {r['acc']:8.4f} {r['acc_norm']:9.4f} {r['wall_s']:8.1f} "
            f"{r['scoring_s']:10.1f}"
        )
    print(
        f"equal acc: {summary['equal_acc']}, equal acc_norm: {summary['equal_acc_norm']}, "
        f"lm-eval / fastserve wall time: {summary['wall_ratio']:.2f}x"
        + ("" if diff is None else f", max |Δ log-likelihood|: {diff:.2e}")
    )


if __name__ == "__main__":
    main()
