"""Tiny Shakespeare quality at equal wall-clock time: FastServe recipe vs nanoGPT baby config.

    python benchmarks/bench_shakespeare.py [--data ../shared/data/tinyshakespeare.txt]
                                           [--long-s 900] [--out benchmarks/out/shakespeare]

Both runs use FastServe's trainer on nanoGPT's split of the file (first 90% train, last 10% val).
  baseline  nanoGPT's CPU "baby" run: byte-level vocabulary (characters, as the file is ASCII),
            4 layers, 4 heads, 128 dim, context 64, batch 12, 2000 iterations, lr 1e-3 -> 1e-4,
            beta2 0.99, warmup 100 (nanoGPT's README reports val loss 1.88 nats/char = 2.71 bpb).
  fastserve the recipe below: a 1024-token BPE (2.5x more text per token), a wider model (192),
            trained for the wall time the baseline took, then again for --long-s seconds (with
            val evaluated every 500 steps in its metrics.jsonl, to show over-fitting if any).
The figure is val bits-per-byte over the whole val split (`fastserve.eval` with non-overlapping
windows of the block size, every byte counted once), so vocabularies of different size are
comparable. Prints a table and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from bench_train import BABY_MODEL  # benchmarks/ is on sys.path when run as a script
from fastserve.data import prepare_data
from fastserve.model import load_model
from fastserve.train import TrainConfig, train
from fastserve.train.budget import steps_for_budget

ROOT = Path(__file__).resolve().parents[1]

BASELINE = dict(
    model="tiny",
    model_overrides={k: v for k, v in BABY_MODEL.items() if k not in ("preset", "vocab_size")},
    batch_size=12,
    block_size=64,
    max_steps=2000,
    lr=1e-3,
    min_lr=1e-4,
    warmup_steps=100,
    beta2=0.99,
    weight_decay=0.1,
    dtype="float32",
)

# Chosen by equal-time trials on this machine (75 s each, val bpb): BPE 1024 > 512 > bytes
# (2.37 / 2.39 / 2.61 at this width); width 192 fp32 > 256 bf16 (2.37 vs 2.40) at this budget;
# batch 8 x 128 with lr 3e-3 ~ batch 16 with lr 2e-3.
FASTSERVE = dict(
    model="tiny",
    model_overrides=dict(
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=6,
        intermediate_size=512,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
    batch_size=8,
    block_size=128,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=50,
    beta2=0.99,
    weight_decay=0.1,
    dtype="float32",
)


def val_bits_per_byte(model_dir: Path, data_dir: Path, block_size: int) -> float:
    """Bits per byte over the whole val split: non-overlapping windows of block_size tokens,
    every token (and so every byte) scored once (fastserve.eval, docs/eval.md)."""
    from fastserve.eval import evaluate

    results = evaluate(
        model_dir, data=[str(data_dir)], context_len=block_size, stride=block_size, batch_size=32
    )
    return results["datasets"][0]["perplexity"]["bits_per_byte"]


def run(name: str, recipe: dict, data_dir: Path, out: Path, max_steps=None, seconds=None, evals=0):
    cfg = TrainConfig(
        data_dir=str(data_dir),
        out_dir=str(out / name),
        eval_interval=evals,
        eval_iters=20 if evals else 0,
        log_interval=50,
        ckpt_interval=0,
        keep_last=1,
        **recipe,
    )
    if seconds is not None:
        vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
        max_steps = steps_for_budget(cfg, vocab, seconds, margin=0.95)
        cfg = dataclasses.replace(cfg, max_time_s=seconds * 1.1)
    cfg = dataclasses.replace(cfg, max_steps=max_steps or cfg.max_steps)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0
    bpb = val_bits_per_byte(result.final_dir, data_dir, cfg.block_size)
    row = dict(
        name=name,
        steps=result.steps,
        train_s=round(train_s, 1),
        tokens_per_s=round(result.tokens_per_s),
        val_bpb=round(bpb, 4),
        params=load_model(result.final_dir).num_parameters(),
    )
    print(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--long-s", type=float, default=900.0, help="the long run's budget (900 s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/shakespeare"))
    ap.add_argument("--skip-long", action="store_true", help="only the equal-time comparison")
    args = ap.parse_args()
    out = Path(args.out)

    char_dir, bpe_dir = out / "data-bytes", out / "data-bpe1024"
    # vocab 259 = the 256 byte tokens + 3 specials: a character-level model on ASCII text
    prepare_data([args.data], char_dir, vocab_size=259, split="tail", progress=False)
    prepare_data([args.data], bpe_dir, vocab_size=1024, split="tail", progress=False)

    rows = [run("baseline-nanogpt-baby", BASELINE, char_dir, out)]
    budget_s = rows[0]["train_s"]
    rows.append(run("fastserve-equal-time", FASTSERVE, bpe_dir, out, seconds=budget_s))
    if not args.skip_long:
        rows.append(run("fastserve-long", FASTSERVE, bpe_dir, out, seconds=args.long_s, evals=500))

    from rich.console import Console
    from rich.table import Table

    base = rows[0]["val_bpb"]
    table = Table(title=f"Tiny Shakespeare val bits/byte ({torch.get_num_threads()} threads)")
    for col in ("run", "params", "steps", "train s", "tok/s", "val bpb", "vs baseline"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["name"],
            f"{r['params'] / 1e6:.2f}M",
            str(r["steps"]),
            f"{r['train_s']:.0f}",
            f"{r['tokens_per_s']:,}",
            f"{r['val_bpb']:.3f}",
            f"{r['val_bpb'] / base:.3f}x",
        )
    Console().print(table)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
