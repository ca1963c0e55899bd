"""Quantized matmul kernels vs dense: median time of one linear layer per (shape, batch rows).

    python benchmarks/bench_kernels.py [--shapes 4096x4096,4096x11008,11008x4096]
                                       [--batches 1,16,64] [--repeats 15]

Shapes are in_features x out_features (Llama-7B's attention and MLP projections). For each shape
and batch it times, on random weights and inputs, in the same run:

    fp32           x fp32 @ W fp32 (the baseline of the ratio column)
    bf16           x bf16 @ W bf16
    w8a16          QuantLinear 8-bit per-channel, its selected path (int8pack below 16 rows, int8x2
                   from 16), fp32 x in and out
    w8a16-int8pack same layer forced through int8pack (bf16 activations) at every batch
    w8a16-bf16x    same layer, selected path, bf16 x (no activation casts)
    w4a16          QuantLinear 4-bit group 128 (int4pack), fp32 x; 3-bit layers run the same kernel
    w8a8           QuantLinear W8A8 (int_mm: per-token int8 x, exact int32 accumulation), fp32 x
    fbgemm-dyn     torch.ops.quantized.linear_dynamic (per-tensor uint8 x, per-channel int8 W):
                   numerics differ from our per-token W8A8, so it is timed for comparison only
    dequant        the fallback path (dequantize W every call, then fp32 matmul) for w4a16

It prints median ms and the ratio fp32 time / path time (> 1: faster than fp32). The quantized rows
time `layer(x)` end to end, so activation casts and W8A8's activation quantization are included;
kernel-layout weights are prepared once before timing (as they are cached on the module).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from fastserve.model.kernels import quant_linear, select_path
from fastserve.model.quantized import QuantLinear, QuantScheme


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _fbgemm(linear: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1) / 127
        zero = torch.zeros_like(scale, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm still works
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)
    except (RuntimeError, AttributeError):
        return None


def _cases(x, linear, w_bf16, layers, fbgemm) -> dict[str, Callable[[], object]]:
    xb = x.bfloat16()
    cases: dict[str, Callable[[], object]] = {
        "fp32": lambda: linear(x),
        "bf16": lambda: xb @ w_bf16.T,
        "w8a16": lambda: layers["w8a16"](x),
        "w8a16-int8pack": lambda: quant_linear(x, layers["w8a16"], path="int8pack"),
        "w8a16-bf16x": lambda: layers["w8a16"](xb),
        "w4a16": lambda: layers["w4a16"](x),
        "w8a8": lambda: layers["w8a8"](x),
    }
    if fbgemm is not None:
        cases["fbgemm-dyn"] = lambda: fbgemm(x)
    cases["dequant"] = lambda: quant_linear(x, layers["w4a16"], path="dequant")
    return cases


@torch.no_grad()
def bench_shape(k: int, n: int, batches: list[int], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False)
    w_bf16 = linear.weight.detach().bfloat16()
    layers = {
        "w8a16": QuantLinear.from_linear(linear, QuantScheme(bits=8)),
        "w4a16": QuantLinear.from_linear(linear, QuantScheme(bits=4, group_size=128)),
        "w8a8": QuantLinear.from_linear(linear, QuantScheme(bits=8, act_bits=8)),
    }
    fbgemm = _fbgemm(linear)
    rows = []
    for m in batches:
        x = torch.randn(m, k)
        for layer in layers.values():
            layer(x[:1])  # build the kernel-layout caches outside the timing
        times = {
            name: _median_ms(fn, repeats if name != "dequant" else 3)
            for name, fn in _cases(x, linear, w_bf16, layers, fbgemm).items()
        }
        for name, ms in times.items():
            path = select_path(layers[name.split("-")[0]], x) if name.startswith("w") else ""
            path = "int8pack" if name == "w8a16-int8pack" else path
            rows.append(dict(shape=f"{k}x{n}", batch=m, name=name, path=path, ms=ms,
                             ratio=times["fp32"] / ms))  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shapes",
        default="4096x4096,4096x11008,11008x4096",
        help="comma-separated in_features x out_features (default: %(default)s)",
    )
    p.add_argument(
        "--batches", default="1,16,64", help="comma-separated batch rows (default: %(default)s)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=15,
        help="timed calls per case; the median is reported (default: %(default)s)",
    )
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':>12} {'batch':>5} {'kernel':>14} {'path':>9} {'median ms':>10} {'vs fp32':>8}")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        for r in bench_shape(k, n, batches, args.repeats):
            print(f"{r['shape']:>12} {r['batch']:>5} {r['name']:>14} {r['path']:>9} "
                  f"{r['ms']:>10.3f} {r['ratio']:>7.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
