"""Training throughput: tokens/s of one optimizer step (forward + backward + AdamW), fp32 vs bf16.

    python benchmarks/bench_train.py [--shapes baby,small,base] [--repeats 5] [--steps 10]

Shapes: nanoGPT's "baby" Shakespeare CPU shape (4 layers, 4 heads, 128 dim, context 64, batch 12,
byte vocabulary), and the `small` and `base` presets (context 256, batch 8, their preset
vocabularies). For each shape it prints the median over --repeats runs of --steps timed steps (after
warm-up steps) for fp32 and for bf16 autocast, and the bf16/fp32 ratio measured in the same run.
Random tokens: this measures the step, not the data pipeline (which memmaps and costs ~nothing).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fastserve.model import LlamaForCausalLM, ModelConfig, resolve_config
from fastserve.train import TrainConfig
from fastserve.train.budget import seconds_per_step

# nanoGPT's CPU "baby" Shakespeare shape as a Llama: 4 layers, 4 heads, 128 dim, context 64, a byte
# vocabulary; SwiGLU's 3 matrices at 352 wide ~ GPT-2's 2 matrices at 4x in parameters.
BABY_MODEL = dict(
    preset="tiny",
    vocab_size=259,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=352,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)

SHAPES = {
    # name: (preset + config overrides, block_size, batch_size)
    "baby": (BABY_MODEL, 64, 12),
    "small": (dict(preset="small"), 256, 8),
    "base": (dict(preset="base"), 256, 8),
}


def _train_config(spec: dict, block: int, batch: int, dtype: str) -> TrainConfig:
    overrides = {k: v for k, v in spec.items() if k not in ("preset", "vocab_size")}
    return TrainConfig(
        data_dir="-",  # not read: the step is timed on random tokens
        out_dir="-",
        model=spec["preset"],
        model_overrides=overrides,
        batch_size=batch,
        block_size=block,
        lr=1e-3,
        weight_decay=0.1,
        beta2=0.95,
        grad_clip=1.0,
        dtype=dtype,
        seed=0,
    )


def _vocab(spec: dict) -> int:
    return spec.get("vocab_size") or ModelConfig.preset(spec["preset"]).vocab_size


def time_steps(spec: dict, block: int, batch: int, dtype: str, steps: int) -> float:
    """Return tokens/s over `steps` optimizer steps after 3 untimed ones."""
    cfg = _train_config(spec, block, batch, dtype)
    step_s = seconds_per_step(cfg, _vocab(spec), probe_steps=steps, warmup_steps=3)
    return batch * block / step_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="baby,small,base", help="comma list of: baby,small,base")
    ap.add_argument("--repeats", type=int, default=5, help="runs per figure; the median is shown")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"training tokens/s (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    for col in ("shape", "params", "block x batch", "fp32 tok/s", "bf16 tok/s", "bf16 / fp32"):
        table.add_column(col, justify="right")
    for name in args.shapes.split(","):
        spec, block, batch = SHAPES[name]
        cfg = _train_config(spec, block, batch, "float32")
        model_config = resolve_config(cfg.model, vocab_size=_vocab(spec), **cfg.model_overrides)
        num_params = LlamaForCausalLM(model_config).num_parameters()
        med = {}
        for dtype in ("float32", "bfloat16"):
            runs = [time_steps(spec, block, batch, dtype, args.steps) for _ in range(args.repeats)]
            med[dtype] = statistics.median(runs)
            print(f"{name} {dtype}: runs {[round(r) for r in runs]} median {med[dtype]:.0f} tok/s")
        table.add_row(
            name,
            f"{num_params / 1e6:.2f}M",
            f"{block} x {batch}",
            f"{med['float32']:.0f}",
            f"{med['bfloat16']:.0f}",
            f"{med['bfloat16'] / med['float32']:.2f}x",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
