"""Kernels for QuantLinear: the one place that decides how a quantized matmul runs.

    y = quant_linear(x, layer)                      # fastest correct path for this layer and input
    y = quant_linear(x, layer, path="dequant")      # force a path (tests, benchmarks)
    y_ref = reference_quant_linear(x, layer)        # x @ dequantize().T (+ bias): the oracle
    select_path(layer, x)                           # the name quant_linear would use

Paths (`PATHS`), each equal to the reference up to the rounding of its compute dtype:

    path       serves                                   how (torch 2.13 CPU kernels)
    int8pack   8-bit weight-only, per-channel,          torch._weight_int8pack_mm, bf16 activations
               symmetric, in_features % 16 == 0
    int4pack   4/3-bit weight-only, groups 32..256      torch._weight_int4pack_mm_for_cpu on a
               (or per-channel), out_features % 16 == 0 kernel-layout copy of the weight, bf16
    int8x2     8-bit weight-only, per-channel,          x split per token into two int8 terms
               symmetric (used from 16 rows on)         x ~ s1 q1 + s2 q2 (s2 = s1 / 254), two
                                                        torch._int_mm calls; error <= absmax/64516
                                                        per element, ~100x below bf16's
    int_mm     W8A8 (act_bits=8)                        per-token int8 activations, torch._int_mm
                                                        (exact int32 accumulation), float32 rescale
    dequant    everything (fallback; any device/dtype)  dequantize to x.dtype, then F.linear

Measured on this machine (2 cores, 4096x4096, see benchmarks/bench_kernels.py): the int8 and int4
CPU kernels are several times faster than an fp32 matmul at batch 1 *with bf16 activations*, but
5-40x slower with fp32 ones, so fp32/fp16 activations are cast to bf16 for them and the output cast
back (the weights carry <= 8 bits, so the bf16 activation rounding, 2^-9 relative, is of the same
order as int8 weight rounding and far below int4's). int8pack stops beating fp32 around 64 rows,
where two exact int8 matmuls (int8x2) are 2-2.5x faster than fp32 and more accurate, so 8-bit
weight-only layers switch at INT8X2_MIN_ROWS. `dequant` rebuilds the float weight on every call
(slow, no extra memory): it is the fallback, not a fast path.

What this module does not know: how weights were quantized (quantized.py, fastserve.compress),
which modules are quantized, files.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastserve.model.quantized import QuantLinear, quantize_activations, unpack_int4_codes

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts
INT4_INNER_K_TILES = 2
# torch 2.13's CPU _weight_int8pack_mm crashes or returns garbage (measured) when the weight or
# activation rows are not 16-byte aligned: in_features % 16 == 0 and aligned base pointers.
INT8PACK_K_MULTIPLE = 16
ALIGN_BYTES = 64
INT8X2_MIN_ROWS = 16  # measured crossover int8pack -> int8x2 (between 8 and 16 rows, 4096-wide)
KERNEL_DTYPE = torch.bfloat16  # activation dtype the CPU int8/int4 kernels are fast with


def reference_quant_linear(x: Tensor, layer: QuantLinear) -> Tensor:
    """x @ dequantize().T (+ bias) in x.dtype; W8A8 layers first fake-quantize x per token (as the
    int_mm path does), in float32."""
    if layer.scheme.act_bits is not None:
        q, s = quantize_activations(x)
        x_fq = q.float() * s
        y = F.linear(x_fq, layer.dequantize())
        if layer.bias is not None:
            y = y + layer.bias.float()
        return y.to(x.dtype)
    w = layer.dequantize().to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, bias)


# ---- paths ---------------------------------------------------------------------------------------


def _flatten(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def _finish(y: Tensor, layer: QuantLinear, lead: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    y = y.to(dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(dtype)
    return y.reshape(*lead, layer.out_features)


def _dequant_path(x: Tensor, layer: QuantLinear) -> Tensor:
    if layer.scheme.act_bits is not None:
        return reference_quant_linear(x, layer)
    w = layer.dequantize().to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, bias)


def _aligned(t: Tensor) -> Tensor:
    """t itself when contiguous and 64-byte aligned, else an aligned copy."""
    if t.is_contiguous() and t.data_ptr() % ALIGN_BYTES == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _int8pack_path(x: Tensor, layer: QuantLinear) -> Tensor:
    key = ("int8pack", x.device)
    scale = layer._kernel_cache.get(key)
    if scale is None:
        # The kernel reads the weight rows with aligned loads: a tensor at an odd offset of a
        # safetensors buffer crashes it, so realign once (replacing, not duplicating, the buffer).
        layer._buffers["weight_packed"] = _aligned(layer.weight_packed)
        scale = _aligned(layer.weight_scale[:, 0].to(KERNEL_DTYPE))
        layer._kernel_cache[key] = scale
    x2, lead = _flatten(x)
    y = torch._weight_int8pack_mm(_aligned(x2.to(KERNEL_DTYPE)), layer.weight_packed, scale)
    return _finish(y, layer, lead, x.dtype)


def int4_group_size(layer: QuantLinear) -> int | None:
    """The int4 kernel's group size for this layer, or None when the kernel cannot serve it.
    Per-channel scales are repeated over the largest supported group dividing in_features."""
    if layer.scheme.group_size is not None:
        g = layer.scheme.group_size
        return g if g in INT4_GROUP_SIZES else None
    return next((g for g in INT4_GROUP_SIZES if layer.in_features % g == 0), None)


def int4_kernel_weights(layer: QuantLinear) -> tuple[Tensor, Tensor, int]:
    """(weight in the kernel's layout, scales_and_zeros [k / g, n, 2] bf16, g) for a 4/3-bit layer.

    The kernel computes w = (code - 8) * scale + offset per (group, row), code = our nibble:
    symmetric:  code = q + 8, w = q * s             -> offset = 0
    asymmetric: code = q,     w = (q - z) * s       -> offset = (8 - z) * s
    """
    g = int4_group_size(layer)
    if g is None:
        raise ValueError(f"the int4 kernel cannot serve group size {layer.scheme.group_size}")
    codes = unpack_int4_codes(layer.weight_packed)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INT4_INNER_K_TILES)
    num_groups = layer.in_features // g
    scale = layer.weight_scale  # [n, groups of the scheme]
    if scale.shape[1] != num_groups:  # per-channel -> repeat over the kernel's groups
        scale = scale.expand(-1, num_groups)
    zero = layer.zero_point()
    if zero is None:
        offset = torch.zeros_like(scale)
    else:
        zero = zero.expand(-1, num_groups) if zero.shape[1] != num_groups else zero
        offset = (8 - zero.float()) * scale
    sz = torch.stack((scale.t(), offset.t()), dim=-1).to(KERNEL_DTYPE).contiguous()
    return packed, sz, g


def _int4pack_path(x: Tensor, layer: QuantLinear) -> Tensor:
    key = ("int4pack", x.device)
    cached = layer._kernel_cache.get(key)
    if cached is None:
        cached = int4_kernel_weights(layer)
        layer._kernel_cache[key] = cached
    packed, sz, g = cached
    x2, lead = _flatten(x)
    y = torch._weight_int4pack_mm_for_cpu(x2.to(KERNEL_DTYPE).contiguous(), packed, g, sz)
    return _finish(y, layer, lead, x.dtype)


def _int_mm_path(x: Tensor, layer: QuantLinear) -> Tensor:
    x2, lead = _flatten(x)
    xq, xs = quantize_activations(x2)
    # y^T = W q^T: with the stored [n, k] weight as the left operand, torch 2.13's CPU _int_mm is
    # 2-3x faster for 2..128 rows than q @ W^T (and equal at 1 row); int32 accumulation is exact.
    acc = torch._int_mm(layer.weight_packed, xq.t()).t()
    y = acc.float() * xs * layer.weight_scale[:, 0]
    return _finish(y, layer, lead, x.dtype)


def split_activations_int8x2(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [m, k] -> (q1, s1, q2, s2): x ~ q1 * s1 + q2 * s2 per row, int8 q, float32 s [m, 1].

    q1 is the per-token int8 quantization of x (s1 = absmax / 127); the residual, at most s1 / 2,
    is quantized again with s2 = s1 / 254, so |x - x~| <= s2 / 2 = absmax / 64516.
    """
    xf = x.float()
    s1 = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    s1 = torch.where(s1 > 0, s1, torch.ones_like(s1))
    q1 = torch.round(xf / s1).clamp(-127, 127)
    s2 = s1 / 254.0
    q2 = torch.round((xf - q1 * s1) / s2).clamp(-127, 127)
    return q1.to(torch.int8), s1, q2.to(torch.int8), s2


def _int8x2_path(x: Tensor, layer: QuantLinear) -> Tensor:
    x2, lead = _flatten(x)
    q1, s1, q2, s2 = split_activations_int8x2(x2)
    w = layer.weight_packed
    acc1 = torch._int_mm(w, q1.t()).t().float()
    acc2 = torch._int_mm(w, q2.t()).t().float()
    y = (acc1 * s1 + acc2 * s2) * layer.weight_scale[:, 0]
    return _finish(y, layer, lead, x.dtype)


PATHS: dict[str, Callable[[Tensor, QuantLinear], Tensor]] = {
    "int8pack": _int8pack_path,
    "int8x2": _int8x2_path,
    "int4pack": _int4pack_path,
    "int_mm": _int_mm_path,
    "dequant": _dequant_path,
}


def supported_paths(layer: QuantLinear, device: torch.device | str = "cpu") -> list[str]:
    """The paths that can serve `layer` on `device` (always ending with "dequant")."""
    s = layer.scheme
    paths: list[str] = []
    if torch.device(device).type == "cpu":
        if s.act_bits == 8:
            paths.append("int_mm")
        elif s.bits == 8 and s.symmetric and s.group_size is None:
            if layer.in_features % INT8PACK_K_MULTIPLE == 0:
                paths.append("int8pack")
            paths.append("int8x2")
        elif s.bits < 8 and layer.out_features % 16 == 0 and int4_group_size(layer) is not None:
            paths.append("int4pack")
    paths.append("dequant")
    return paths


def select_path(layer: QuantLinear, x: Tensor) -> str:
    """The policy: the first supported path, except that 8-bit weight-only layers use int8x2 from
    INT8X2_MIN_ROWS rows on (numbers: benchmarks/bench_kernels.py, docs/formats.md)."""
    paths = supported_paths(layer, x.device)
    if paths[0] == "int8pack" and x.shape[:-1].numel() >= INT8X2_MIN_ROWS:
        return "int8x2"
    return paths[0]


def quant_linear(x: Tensor, layer: QuantLinear, path: str | None = None) -> Tensor:
    """y = layer(x) for x [..., in_features] through `path` (None = select_path)."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {layer.in_features}")
    if path is None:
        path = select_path(layer, x)
    elif path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}; known: {sorted(PATHS)}")
    elif path not in supported_paths(layer, x.device):
        raise ValueError(f"path {path!r} cannot serve {layer.scheme} on {x.device}")
    if x.shape[:-1].numel() == 0:
        return _dequant_path(x, layer)
    return PATHS[path](x, layer)
