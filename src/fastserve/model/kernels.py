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

The kernels take tensors (`int8pack_mm`, `int8x2_mm`, `int4pack_mm`, `w8a8_mm`, `dequant_mm`
and the layout conversion `int4pack_weights`); `quant_linear` and the policy read them off any
object with the `QuantWeights` fields (QuantLinear has them), so this module imports nothing of
fastserve.model and quantized.py imports it, not the other way round.

What this module does not know: how weights were quantized (quantized.py, fastserve.compress),
which modules are quantized, files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts
INT4_INNER_K_TILES = 2
# torch 2.13's CPU _weight_int8pack_mm crashes or returns garbage (measured) when the weight or
# activation rows are not 16-byte aligned: in_features % 16 == 0 and aligned base pointers.
INT8PACK_K_MULTIPLE = 16
ALIGN_BYTES = 64
INT8X2_MIN_ROWS = 16  # measured crossover int8pack -> int8x2 (between 8 and 16 rows, 4096-wide)
KERNEL_DTYPE = torch.bfloat16  # activation dtype the CPU int8/int4 kernels are fast with


class QuantWeights(Protocol):
    """What the policy and `quant_linear` read from a quantized linear (QuantLinear's fields)."""

    in_features: int
    out_features: int
    scheme: Any  # .bits, .group_size, .symmetric, .act_bits (a QuantScheme)
    weight_packed: Tensor  # int8/uint8 [out, in] (8-bit) or uint8 [out, in // 2] (4/3-bit)
    weight_scale: Tensor  # float32 [out, n_groups]
    bias: Tensor | None
    _kernel_cache: dict[Any, Any]  # kernel-layout copies, dropped whenever the weights change

    def zero_point(self) -> Tensor | None: ...  # int32 [out, n_groups], None when symmetric

    def dequantize(self) -> Tensor: ...  # float32 [out, in]

    def int4_codes(self) -> Tensor: ...  # int32 [out, in]: the unsigned nibble codes


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token int8: x [..., k] -> (q int8 [..., k], scale float32 [..., 1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


def w8a8_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x fake-quantized per token (as the int_mm path does), times the float weight, in float32;
    the output in x.dtype."""
    q, s = quantize_activations(x)
    y = F.linear(q.float() * s, weight)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def reference_quant_linear(x: Tensor, layer: QuantWeights) -> Tensor:
    """x @ dequantize().T (+ bias) in x.dtype; W8A8 layers first fake-quantize x per token (as the
    int_mm path does), in float32."""
    if layer.scheme.act_bits is not None:
        return w8a8_reference(x, layer.dequantize(), layer.bias)
    w = layer.dequantize().to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, w, bias)


# ---- kernels: tensors in, tensors out ------------------------------------------------------------
# x2 is [rows, in] (rows >= 1); each returns [rows, out] in the kernel's output dtype, without bias.


def _aligned(t: Tensor) -> Tensor:
    """t itself when contiguous and 64-byte aligned, else an aligned copy."""
    if t.is_contiguous() and t.data_ptr() % ALIGN_BYTES == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def int8pack_mm(x2: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """8-bit weight-only per-channel: q int8 [out, in] and scale [out] (KERNEL_DTYPE), both
    64-byte aligned (torch 2.13's kernel crashes on misaligned rows; `_aligned` makes them so)."""
    return torch._weight_int8pack_mm(_aligned(x2.to(KERNEL_DTYPE)), q, scale)


def int4pack_weights(
    codes: Tensor, scale: Tensor, zero: Tensor | None, group_size: int
) -> tuple[Tensor, Tensor]:
    """(weight in the int4 kernel's layout, scales_and_zeros [k / g, n, 2] bf16) from the nibble
    codes int32 [n, k], scale float32 [n, groups] and zero int32 [n, groups] (None: symmetric);
    per-channel scales (one group) are repeated over the kernel's groups of `group_size`.

    The kernel computes w = (code - 8) * scale + offset per (group, row):
    symmetric:  code = q + 8, w = q * s             -> offset = 0
    asymmetric: code = q,     w = (q - z) * s       -> offset = (8 - z) * s
    """
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INT4_INNER_K_TILES)
    num_groups = codes.shape[1] // group_size
    if scale.shape[1] != num_groups:  # per-channel -> repeat over the kernel's groups
        scale = scale.expand(-1, num_groups)
    if zero is None:
        offset = torch.zeros_like(scale)
    else:
        zero = zero.expand(-1, num_groups) if zero.shape[1] != num_groups else zero
        offset = (8 - zero.float()) * scale
    sz = torch.stack((scale.t(), offset.t()), dim=-1).to(KERNEL_DTYPE).contiguous()
    return packed, sz


def int4pack_mm(x2: Tensor, packed: Tensor, group_size: int, sz: Tensor) -> Tensor:
    """4/3-bit weight-only: the kernel-layout weight and scales of `int4pack_weights`."""
    return torch._weight_int4pack_mm_for_cpu(
        x2.to(KERNEL_DTYPE).contiguous(), packed, group_size, sz
    )


def w8a8_mm(x2: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """W8A8: per-token int8 x times q int8 [out, in] (exact int32 accumulation), float32 rescale
    by scale float32 [out]."""
    xq, xs = quantize_activations(x2)
    # y^T = W q^T: with the stored [n, k] weight as the left operand, torch 2.13's CPU _int_mm is
    # 2-3x faster for 2..128 rows than q @ W^T (and equal at 1 row); int32 accumulation is exact.
    acc = torch._int_mm(q, xq.t()).t()
    return acc.float() * xs * scale


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


def int8x2_mm(x2: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """8-bit weight-only per-channel through two exact int8 matmuls (split_activations_int8x2);
    q int8 [out, in], scale float32 [out]; float32 output."""
    q1, s1, q2, s2 = split_activations_int8x2(x2)
    acc1 = torch._int_mm(q, q1.t()).t().float()
    acc2 = torch._int_mm(q, q2.t()).t().float()
    return (acc1 * s1 + acc2 * s2) * scale


# ---- paths: a layer's tensors -> a kernel (kernel-layout copies cached on the layer) -------------


def _flatten(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def _finish(y: Tensor, layer: QuantWeights, lead: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    y = y.to(dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(dtype)
    return y.reshape(*lead, layer.out_features)


def _dequant_path(x: Tensor, layer: QuantWeights) -> Tensor:
    return reference_quant_linear(x, layer)


def _int8pack_path(x: Tensor, layer: QuantWeights) -> Tensor:
    key = ("int8pack", x.device)
    cached = layer._kernel_cache.get(key)
    if cached is None:
        # A tensor at an odd offset of a safetensors buffer crashes the kernel: realign once,
        # replacing (not duplicating) the layer's buffer.
        layer.weight_packed = _aligned(layer.weight_packed)
        cached = _aligned(layer.weight_scale[:, 0].to(KERNEL_DTYPE))
        layer._kernel_cache[key] = cached
    x2, lead = _flatten(x)
    return _finish(int8pack_mm(x2, layer.weight_packed, cached), layer, lead, x.dtype)


def int4_group_size(layer: QuantWeights) -> int | None:
    """The int4 kernel's group size for this layer, or None when the kernel cannot serve it.
    Per-channel scales are repeated over the largest supported group dividing in_features."""
    if layer.scheme.group_size is not None:
        g = layer.scheme.group_size
        return g if g in INT4_GROUP_SIZES else None
    return next((g for g in INT4_GROUP_SIZES if layer.in_features % g == 0), None)


def int4_kernel_weights(layer: QuantWeights) -> tuple[Tensor, Tensor, int]:
    """(weight in the kernel's layout, scales_and_zeros [k / g, n, 2] bf16, g) for a 4/3-bit layer
    (int4pack_weights on its tensors)."""
    g = int4_group_size(layer)
    if g is None:
        raise ValueError(f"the int4 kernel cannot serve group size {layer.scheme.group_size}")
    packed, sz = int4pack_weights(layer.int4_codes(), layer.weight_scale, layer.zero_point(), g)
    return packed, sz, g


def _int4pack_path(x: Tensor, layer: QuantWeights) -> Tensor:
    key = ("int4pack", x.device)
    cached = layer._kernel_cache.get(key)
    if cached is None:
        cached = int4_kernel_weights(layer)
        layer._kernel_cache[key] = cached
    packed, sz, g = cached
    x2, lead = _flatten(x)
    return _finish(int4pack_mm(x2, packed, g, sz), layer, lead, x.dtype)


def _int_mm_path(x: Tensor, layer: QuantWeights) -> Tensor:
    x2, lead = _flatten(x)
    return _finish(w8a8_mm(x2, layer.weight_packed, layer.weight_scale[:, 0]), layer, lead, x.dtype)


def _int8x2_path(x: Tensor, layer: QuantWeights) -> Tensor:
    x2, lead = _flatten(x)
    y = int8x2_mm(x2, layer.weight_packed, layer.weight_scale[:, 0])
    return _finish(y, layer, lead, x.dtype)


PATHS: dict[str, Callable[[Tensor, QuantWeights], Tensor]] = {
    "int8pack": _int8pack_path,
    "int8x2": _int8x2_path,
    "int4pack": _int4pack_path,
    "int_mm": _int_mm_path,
    "dequant": _dequant_path,
}


def supported_paths(layer: QuantWeights, device: torch.device | str = "cpu") -> list[str]:
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


def select_path(layer: QuantWeights, x: Tensor) -> str:
    """The policy: the first supported path, except that 8-bit weight-only layers use int8x2 from
    INT8X2_MIN_ROWS rows on (numbers: benchmarks/bench_kernels.py, docs/formats.md)."""
    paths = supported_paths(layer, x.device)
    if paths[0] == "int8pack" and x.shape[:-1].numel() >= INT8X2_MIN_ROWS:
        return "int8x2"
    return paths[0]


def quant_linear(x: Tensor, layer: QuantWeights, path: str | None = None) -> Tensor:
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
