"""The main job (`make demo`, `fastserve demo`): the loop as far as it exists, on built-in data.

    data (builtin:stdlib -> 4096-token BPE -> shards)  ->  train `small` for a wall-clock budget
      ->  serve a batch of prompts with the engine  ->  print val bits-per-byte, a sample, tok/s

Everything lands under one directory (default runs/demo): data/, train/ (metrics.jsonl,
checkpoints/, model/). Shards already there with the same settings are reused; the training run
always starts fresh so the printed figures belong to this run. The corpus is the running Python's
standard library, so nothing is downloaded. Later stages (compress, serve, evaluate) extend this
job as they land.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.panel import Panel
from rich.table import Table

from fastserve.errors import DataError
from fastserve.utils.console import console

if TYPE_CHECKING:
    from fastserve.train import TrainConfig

DEMO_VOCAB_SIZE = 4096
DEMO_PROMPT = "def read_config(path):\n"
DEMO_BATCH_PROMPTS = ["import", "class", "def", "return", "for", "with", "if", "try"] * 2


def _prepare(data_dir: Path, max_bytes: int | None):
    from fastserve.data import ShardMeta, format_report, prepare_data

    try:
        meta = ShardMeta.load(data_dir)
        if meta.vocab_size == DEMO_VOCAB_SIZE and meta.stats.get("max_bytes") == max_bytes:
            console.print(f"reusing shards in {data_dir}")
            return meta
    except DataError:
        pass
    meta = prepare_data(
        ["builtin:stdlib"], data_dir, vocab_size=DEMO_VOCAB_SIZE, max_bytes=max_bytes
    )
    console.print(format_report(meta))
    return meta


def demo_train_config(data_dir: Path, out_dir: Path, device: str, model: str) -> TrainConfig:
    """The demo's training recipe: `small` (~5M params), 256-token windows, bf16 autocast."""
    from fastserve.train import TrainConfig

    return TrainConfig(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        model=model,
        batch_size=16,
        block_size=256,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=30,
        dtype="bfloat16",
        eval_interval=100,
        eval_iters=10,
        log_interval=10,
        ckpt_interval=100,
        keep_last=2,
        device=device,
    )


def run_demo(
    out: str | Path,
    train_seconds: float = 240.0,
    device: str = "cpu",
    model: str = "small",
    max_bytes: int | None = None,
) -> dict:
    """Run data -> train -> generate under `out`; return the figures it prints."""
    from fastserve.engine import LLM, SamplingParams
    from fastserve.train import train
    from fastserve.train.budget import steps_for_budget

    out = Path(out)
    t0 = time.perf_counter()
    console.rule("1/3 data: builtin:stdlib -> tokenizer + shards")
    meta = _prepare(out / "data", max_bytes)

    console.rule(f"2/3 train: `{model}` for ~{train_seconds:.0f} s")
    cfg = demo_train_config(out / "data", out / "train", device, model)
    steps = steps_for_budget(cfg, meta.vocab_size, train_seconds)
    cfg = dataclasses.replace(cfg, max_steps=steps, max_time_s=train_seconds * 1.25)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a fresh run: figures belong to this run
    console.print(f"{steps} steps of {cfg.batch_size} x {cfg.block_size} tokens fit the budget")
    result = train(cfg)

    console.rule("3/3 serve: the engine generates for a batch of prompts")
    llm = LLM(str(result.final_dir), device=device, kv_cache_memory="256MiB")
    prompts = [DEMO_PROMPT] + [f"{kw} " for kw in DEMO_BATCH_PROMPTS]
    params = SamplingParams(max_tokens=120, temperature=0.8, top_k=50, seed=0)
    t_gen = time.perf_counter()
    outs = llm.generate(prompts, params)
    gen_s = time.perf_counter() - t_gen
    num_generated = sum(len(o.outputs[0].token_ids) for o in outs)
    sample = DEMO_PROMPT + outs[0].outputs[0].text
    console.print(Panel(sample, title="sample (temperature 0.8, top-k 50)"), markup=False)

    figures = {
        "steps": result.steps,
        "val_loss": result.last_val_loss,
        "val_bpb": result.val_bpb,
        "tokens_per_s": result.tokens_per_s,
        "model_dir": str(result.final_dir),
        "engine_tokens_per_s": num_generated / gen_s,
        "total_s": time.perf_counter() - t0,
    }
    table = Table(title="demo result")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("optimizer steps", f"{result.steps}")
    table.add_row("val loss (nats/token)", f"{result.last_val_loss:.4f}")
    table.add_row("val bits per byte", f"{result.val_bpb:.4f}")
    table.add_row("training tokens/s", f"{result.tokens_per_s:,.0f}")
    table.add_row(
        f"engine: {len(prompts)} prompts, output tokens/s", f"{figures['engine_tokens_per_s']:,.0f}"
    )
    table.add_row("model dir (HF format)", str(result.final_dir))
    table.add_row("wall time", f"{figures['total_s']:.0f} s")
    console.print(table)
    return figures
