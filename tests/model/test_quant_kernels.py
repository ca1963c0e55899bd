"""Every kernel path equals the dequantize-then-matmul reference on random inputs.

Tolerances. The oracle is float64: x (rounded to bf16 first for the bf16 kernels, since they see
bf16 activations) times the exact dequantized weight. The bf16 kernels round each scale (and, for
asymmetric int4, each offset (8 - z) * s) to bf16, accumulate in float32 and round the output to
bf16: every term is off by at most ~2^-9 of |x_j| (|w_ij| + 8 s_ij) and the result by 2^-9 of |y|.
We allow twice that (2^-8). The int_mm path accumulates exactly in int32 and rescales in float32:
1e-5 of the |x| |w| envelope. int8x2 represents x to within absmax(x_row) / 64516 per element
(proved in split_activations_int8x2), so its bound is that times sum_j |w_ij|, plus 1e-5 of the
envelope for the float32 rescale (and 2^-8 |y| when the output is bf16).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastserve.model.kernels import (
    INT8X2_MIN_ROWS,
    KERNEL_DTYPE,
    PATHS,
    quant_linear,
    reference_quant_linear,
    select_path,
    split_activations_int8x2,
    supported_paths,
)
from fastserve.model.quantized import QuantLinear, QuantScheme, quantize_activations

BF16_REL = 2.0**-8


def _layer(scheme: QuantScheme, in_features=256, out_features=48, bias=True, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.add_(0.02)  # off-centre, so asymmetric zero points are not all 8 / 128
        if bias:
            lin.bias.normal_()
    return QuantLinear.from_linear(lin, scheme)


def _oracle(x: torch.Tensor, layer: QuantLinear, act_rounding: torch.dtype | None):
    """(float64 reference, float64 envelope sum_j |x_j| (|w_ij| + 8 s_ij)) for x [..., in]; the
    8 s term (the rounded int4 offset) only for asymmetric 4/3-bit layers."""
    xd = x.to(act_rounding).double() if act_rounding is not None else x.double()
    if layer.scheme.act_bits is not None:
        q, s = quantize_activations(x)
        xd = q.double() * s.double()
    w = layer.dequantize().double()
    n_groups = layer.weight_scale.shape[1]
    s_full = layer.weight_scale.double().repeat_interleave(layer.in_features // n_groups, dim=1)
    y = xd @ w.T
    offset = 8 * s_full if (layer.scheme.bits < 8 and not layer.scheme.symmetric) else 0
    env = xd.abs() @ (w.abs() + offset).T
    if layer.bias is not None:
        b = layer.bias.double()
        y = y + b
        env = env + b.abs()
    return y, env


CASES = {
    # name: (scheme, in_features, out_features)
    "w8-channel": (QuantScheme(bits=8), 256, 48),
    "w8-channel-odd-out": (QuantScheme(bits=8), 96, 37),
    "w4-g32-sym": (QuantScheme(bits=4, group_size=32), 256, 48),
    "w4-g64-asym": (QuantScheme(bits=4, group_size=64, symmetric=False), 256, 48),
    "w4-g128-sym": (QuantScheme(bits=4, group_size=128), 256, 32),
    "w4-g256-asym": (QuantScheme(bits=4, group_size=256, symmetric=False), 512, 16),
    "w4-channel-sym": (QuantScheme(bits=4), 96, 48),  # kernel groups of 32 repeat the scale
    "w3-g128-sym": (QuantScheme(bits=3, group_size=128), 256, 48),
    "w3-g32-asym": (QuantScheme(bits=3, group_size=32, symmetric=False), 256, 48),
    "w8a8": (QuantScheme(bits=8, act_bits=8), 256, 48),
    "w8a8-odd": (QuantScheme(bits=8, act_bits=8), 100, 37),
}
CASES["w8-k100"] = (QuantScheme(bits=8), 100, 48)  # int8pack needs k % 16 == 0; int8x2 does not
# case: (supported paths, path at 1 row, path at INT8X2_MIN_ROWS rows)
EXPECTED_PATHS = {
    "w8-channel": (["int8pack", "int8x2", "dequant"], "int8pack", "int8x2"),
    "w8-channel-odd-out": (["int8pack", "int8x2", "dequant"], "int8pack", "int8x2"),
    "w8-k100": (["int8x2", "dequant"], "int8x2", "int8x2"),
    "w8a8": (["int_mm", "dequant"], "int_mm", "int_mm"),
    "w8a8-odd": (["int_mm", "dequant"], "int_mm", "int_mm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_policy_uses_the_specialised_kernel(case):
    scheme, k, n = CASES[case]
    layer = _layer(scheme, k, n)
    paths, one_row, many_rows = EXPECTED_PATHS.get(
        case, (["int4pack", "dequant"], "int4pack", "int4pack")
    )
    assert supported_paths(layer) == paths
    assert select_path(layer, torch.zeros(1, k)) == one_row
    assert select_path(layer, torch.zeros(2, INT8X2_MIN_ROWS // 2, k)) == many_rows


@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_every_path_equals_the_reference(case, x_dtype, rows):
    scheme, k, n = CASES[case]
    layer = _layer(scheme, k, n)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(x_dtype)
    for path in supported_paths(layer):
        y = quant_linear(x, layer, path=path)
        assert y.dtype == x_dtype and y.shape == (rows, n)
        exact = path in ("int_mm", "int8x2") or (path == "dequant" and x_dtype == torch.float32)
        act_rounding = KERNEL_DTYPE if path in ("int8pack", "int4pack") else None
        ref, env = _oracle(x, layer, act_rounding)
        if exact and x_dtype == torch.float32:
            tol = 1e-5 * env
        else:  # bf16 compute or bf16 output
            tol = BF16_REL * (env + ref.abs())
        if path == "int8x2":
            x_err = x.double().abs().amax(-1, keepdim=True) / 64516
            tol = tol + x_err * layer.dequantize().double().abs().sum(-1)
        err = (y.double() - ref).abs()
        assert bool((err <= tol).all()), f"{path}: max err {err.max():.3g}, tol {tol.min():.3g}"
        # the tolerance is far below the signal: a wrong layout or scale would not pass
        assert float(tol.max()) < 0.1 * float(ref.abs().max())


def test_int8x2_split_bound():
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(5)) * 3
    x[2] = 0.0
    x[4, 7] = 100.0  # an outlier row
    q1, s1, q2, s2 = split_activations_int8x2(x)
    assert q1.dtype == q2.dtype == torch.int8
    approx = q1.double() * s1.double() + q2.double() * s2.double()
    bound = x.double().abs().amax(-1, keepdim=True) / 64516
    # + float32 rounding of the residual x - q1 s1 (~2^-24 |x|, under 1% of the bound)
    assert bool(((approx - x.double()).abs() <= bound * 1.01).all())
    assert torch.equal(approx[2], torch.zeros(300, dtype=torch.float64))
    # 100x tighter than bf16 rounding of the row maxima
    assert float((approx - x.double()).abs().max()) < 2**-9 * 100 / 50


def test_reference_matches_float64_for_fp32_inputs():
    layer = _layer(QuantScheme(bits=4, group_size=32, symmetric=False))
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(9))
    ref, env = _oracle(x, layer, None)
    assert bool(((reference_quant_linear(x, layer).double() - ref).abs() <= 1e-5 * env).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_tolerance_catches_a_nibble_order_bug(symmetric):
    """Sanity of the comparison itself: swapping the two values of every byte (the packing bug
    most likely to slip in) must show up beyond the tolerance."""
    layer = _layer(QuantScheme(bits=4, group_size=32, symmetric=symmetric))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    ref, env = _oracle(x, layer, KERNEL_DTYPE)
    q = layer.q_values()
    swapped = torch.stack((q[:, 1::2], q[:, 0::2]), dim=-1).reshape(q.shape)
    with torch.no_grad():
        layer.set_quantized(swapped, layer.weight_scale, layer.zero_point())
    err = (quant_linear(x, layer, path="int4pack").double() - ref).abs()
    assert bool((err > BF16_REL * (env + ref.abs())).any())


def test_kernel_cache_is_rebuilt_after_new_weights():
    layer = _layer(QuantScheme(bits=4, group_size=32))
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2))
    y1 = quant_linear(x, layer, path="int4pack")
    assert layer._kernel_cache  # converted once, then reused
    with torch.no_grad():
        layer.set_quantized(-layer.q_values().clamp(min=-7), layer.weight_scale, None)
    y2 = quant_linear(x, layer, path="int4pack")
    torch.testing.assert_close(y2, reference_quant_linear(x.bfloat16(), layer).float(), **_BF16)
    assert not torch.allclose(y1, y2)
    layer.to(torch.float32)  # any _apply drops the cache
    assert not layer._kernel_cache


_BF16 = dict(rtol=2e-2, atol=2e-2)


def _misaligned(t: torch.Tensor, offset_bytes: int = 3) -> torch.Tensor:
    """The same values at an odd address (as a tensor in a safetensors buffer can be)."""
    flat = torch.empty(t.numel() * t.element_size() + offset_bytes, dtype=torch.uint8)
    out = flat[offset_bytes:].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def test_int8pack_survives_misaligned_weights_and_inputs():
    """torch's int8 CPU kernel crashes on unaligned rows; the path realigns them."""
    layer = _layer(QuantScheme(bits=8), 64, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    expected = quant_linear(x, layer, path="int8pack")
    layer._buffers["weight_packed"] = _misaligned(layer.weight_packed)
    layer._kernel_cache.clear()
    assert layer.weight_packed.data_ptr() % 16 != 0
    torch.testing.assert_close(quant_linear(_misaligned(x, 2), layer, path="int8pack"), expected)


def test_batched_3d_input_and_empty_input():
    layer = _layer(QuantScheme(bits=8))
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(3))
    y = layer(x)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y, quant_linear(x.reshape(10, 256), layer).reshape(2, 5, 48))
    assert layer(torch.zeros(0, 256)).shape == (0, 48)


def test_fallback_and_errors():
    # 8-bit per-group / asymmetric, int4 with out_features % 16 != 0, group 16: dequant only
    for scheme, k, n in [
        (QuantScheme(bits=8, group_size=32), 64, 16),
        (QuantScheme(bits=8, symmetric=False), 64, 16),
        (QuantScheme(bits=4, group_size=32), 64, 24),
        (QuantScheme(bits=4, group_size=16), 64, 16),
        (QuantScheme(bits=4), 50, 16),  # no kernel group divides 50
    ]:
        layer = _layer(scheme, k, n)
        assert supported_paths(layer) == ["dequant"], scheme
        x = torch.randn(3, k)
        torch.testing.assert_close(layer(x), reference_quant_linear(x, layer))
    layer = _layer(QuantScheme(bits=4, group_size=32))
    with pytest.raises(ValueError, match="unknown kernel path"):
        quant_linear(torch.zeros(1, 256), layer, path="cuda-magic")
    with pytest.raises(ValueError, match="path 'int8pack' cannot serve"):
        quant_linear(torch.zeros(1, 256), layer, path="int8pack")
    with pytest.raises(ValueError, match="input has 128 features"):
        layer(torch.zeros(1, 128))
    assert set(PATHS) == {"int8pack", "int8x2", "int4pack", "int_mm", "dequant"}
