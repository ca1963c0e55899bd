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
import time

import torch

from fastserve.model import LlamaForCausalLM, ModelConfig
from fastserve.train.optim import build_optimizer

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


def _make_model(spec: dict) -> LlamaForCausalLM:
    spec = dict(spec)
    config = ModelConfig.preset(spec.pop("preset"), **spec)
    model = LlamaForCausalLM(config)
    model.init_weights(seed=0)
    return model


def time_steps(
    spec: dict, block: int, batch: int, dtype: str, steps: int, warmup: int = 3
) -> float:
    """Return tokens/s over `steps` optimizer steps after `warmup` untimed ones."""
    model = _make_model(spec)
    model.train()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device="cpu")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, block + 1), generator=gen)
    inputs, targets = x[:, :-1], x[:, 1:]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step() -> None:
        with autocast:
            logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, vocab), targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * block / (time.perf_counter() - t0)


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
        num_params = _make_model(spec).num_parameters()
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
