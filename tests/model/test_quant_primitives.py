"""Quantization primitives: schemes, RTN qparams, quantize/dequantize bounds, int4 packing,
QuantLinear construction and model surgery."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_ids, tiny_model
from torch import nn

from fastserve.model.quantized import (
    QuantLinear,
    QuantScheme,
    compute_qparams,
    dequantize,
    fake_quantize,
    pack_int4,
    quantization_modules,
    quantize,
    quantize_activations,
    quantize_model,
    replace_linear,
    unpack_int4,
)

SCHEMES = [
    QuantScheme(bits=b, group_size=g, symmetric=sym)
    for b in (8, 4, 3)
    for g in (None, 32)
    for sym in (True, False)
]


def _id(s: QuantScheme) -> str:
    return f"w{s.bits}-g{s.group_size}-{'sym' if s.symmetric else 'asym'}"


# ---- QuantScheme ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bits=2), "bits"),
        (dict(bits=True), "bits"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=-32), "group_size"),
        (dict(symmetric="yes"), "symmetric"),
        (dict(act_bits=4), "act_bits"),
        (dict(bits=4, act_bits=8), "act_bits"),
        (dict(act_bits=8, group_size=32), "act_bits"),
    ],
)
def test_scheme_validate_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantScheme(**kwargs).validate()


def test_scheme_validate_in_features():
    with pytest.raises(ValueError, match="does not divide in_features 100"):
        QuantScheme(bits=4, group_size=32).validate(100)
    with pytest.raises(ValueError, match="must be even"):
        QuantScheme(bits=4).validate(33)
    QuantScheme(bits=8).validate(33)  # 8-bit has no packing constraint
    assert QuantScheme(bits=4, group_size=32).num_groups(128) == 4
    assert QuantScheme(bits=4).num_groups(128) == 1


def test_scheme_dict_round_trip_and_errors():
    for s in SCHEMES + [QuantScheme(bits=8, act_bits=8)]:
        assert QuantScheme.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown quantization scheme field"):
        QuantScheme.from_dict({"bits": 4, "group": 128})
    with pytest.raises(ValueError, match="bits"):
        QuantScheme.from_dict({"bits": 5})


# ---- qparams, quantize, dequantize ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=_id)
def test_rtn_error_at_most_half_a_step(scheme):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g) * 0.1 + 0.03  # off-centre so asymmetric matters
    w[3] = 0.0  # an all-zero row: scale must not be 0
    w[5, :32] = torch.rand(32, generator=g)  # a group with only positive values
    scale, zero = compute_qparams(w, scheme)
    n_groups = scheme.num_groups(64)
    assert scale.shape == (24, n_groups) and scale.dtype == torch.float32
    assert bool((scale > 0).all())
    if scheme.symmetric:
        assert zero is None
    else:
        assert zero.shape == (24, n_groups) and zero.dtype == torch.int32
        assert int(zero.min()) >= scheme.qmin and int(zero.max()) <= scheme.qmax
    q = quantize(w, scale, zero, scheme)
    assert q.dtype == scheme.q_dtype and q.shape == w.shape
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    wq = dequantize(q, scale, zero, scheme)
    step = scale.repeat_interleave(64 // n_groups, dim=1)
    assert bool(((wq - w).abs() <= step / 2 + 1e-7).all())
    assert torch.equal(wq[3], torch.zeros(64))  # zero is exactly representable
    assert torch.equal(fake_quantize(w, scheme), wq)
    # symmetric scales are exactly absmax / qmax: the extreme value is representable
    if scheme.symmetric:
        absmax = w.abs().reshape(24, n_groups, -1).amax(-1)
        nz = absmax > 0
        torch.testing.assert_close(scale[nz], absmax[nz] / scheme.qmax)


def test_asymmetric_uses_the_full_range():
    scheme = QuantScheme(bits=4, symmetric=False)
    w = torch.linspace(-0.2, 1.3, 64).reshape(1, 64)
    scale, zero = compute_qparams(w, scheme)
    q = quantize(w, scale, zero, scheme)
    assert int(q.min()) == 0 and int(q.max()) == 15
    torch.testing.assert_close(scale, torch.tensor([[1.5 / 15]]))


def test_qparams_on_one_group_slice_match_the_full_matrix():
    """GPTQ calls compute_qparams on one group's columns at a time."""
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    scale, zero = compute_qparams(w, scheme)
    for i in range(4):
        s_i, z_i = compute_qparams(w[:, 16 * i : 16 * (i + 1)], scheme)
        assert torch.equal(s_i, scale[:, i : i + 1]) and torch.equal(z_i, zero[:, i : i + 1])


def test_quantize_clamps_out_of_range_values():
    scheme = QuantScheme(bits=4)
    scale = torch.full((1, 1), 0.1)
    q = quantize(torch.tensor([[5.0, -5.0, 0.26, -0.26]]), scale, None, scheme)
    assert q.tolist() == [[7, -8, 3, -3]]


def test_compute_qparams_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        compute_qparams(torch.randn(4), QuantScheme())
    with pytest.raises(ValueError, match="does not divide"):
        compute_qparams(torch.randn(4, 48), QuantScheme(bits=4, group_size=32))


def test_activation_quantization_is_per_token():
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    x[1, 2] = 0.0
    q, s = quantize_activations(x)
    assert q.dtype == torch.int8 and s.shape == (3, 5, 1)
    assert bool(((q.float() * s - x).abs() <= s / 2 + 1e-7).all())
    assert int(q.abs().amax(-1).min()) == 127 or bool((x[1, 2] == 0).all())  # each row hits 127
    assert int(q.abs().amax(-1)[0, 0]) == 127


# ---- int4 packing --------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric, lo, hi", [(True, -8, 7), (False, 0, 15), (True, -4, 3)])
def test_pack_unpack_round_trip(symmetric, lo, hi):
    g = torch.Generator().manual_seed(3)
    q = torch.randint(lo, hi + 1, (5, 38), generator=g, dtype=torch.int8)
    q[0, :2] = torch.tensor([lo, hi], dtype=torch.int8)  # both extremes present
    p = pack_int4(q, symmetric)
    assert p.dtype == torch.uint8 and p.shape == (5, 19)
    assert torch.equal(unpack_int4(p, symmetric), q)


def test_pack_layout_low_nibble_is_the_even_column():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.int8)
    assert pack_int4(q, symmetric=False).tolist() == [[0x21, 0x0F]]
    # symmetric: nibble = q + 8
    qs = torch.tensor([[-8, 7]], dtype=torch.int8)
    assert pack_int4(qs, symmetric=True).tolist() == [[0x0 | (0xF << 4)]]


def test_pack_errors():
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8), True)
    with pytest.raises(ValueError, match="2-D"):
        pack_int4(torch.zeros(4, dtype=torch.int8), True)
    with pytest.raises(ValueError, match=r"symmetric int4 values must lie in \[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8), True)
    with pytest.raises(ValueError, match=r"asymmetric int4 values must lie in \[0, 15\]"):
        pack_int4(torch.tensor([[-1, 0]], dtype=torch.int8), False)
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.zeros(2, 2), True)
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int8), True)


# ---- QuantLinear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=_id)
def test_from_linear_stores_what_quantize_returns(scheme):
    lin = nn.Linear(64, 48, bias=True)
    ql = QuantLinear.from_linear(lin, scheme)
    scale, zero = compute_qparams(lin.weight, scheme)
    q = quantize(lin.weight, scale, zero, scheme)
    assert torch.equal(ql.q_values(), q)
    assert torch.equal(ql.weight_scale, scale)
    expected_packed = (48, 64) if scheme.bits == 8 else (48, 32)
    assert tuple(ql.weight_packed.shape) == expected_packed
    assert ql.weight_packed.dtype == (scheme.q_dtype if scheme.bits == 8 else torch.uint8)
    if scheme.symmetric:
        assert ql.weight_zero_point is None
    else:
        assert ql.weight_zero_point.dtype == torch.uint8 and torch.equal(ql.zero_point(), zero)
    assert torch.equal(ql.dequantize(), dequantize(q, scale, zero, scheme))
    assert torch.equal(ql.bias, lin.bias.detach())
    names = {n for n, _ in ql.state_dict().items()}
    assert names == {"weight_packed", "weight_scale", "bias"} | (
        set() if scheme.symmetric else {"weight_zero_point"}
    )


@pytest.mark.parametrize("bits, rel_tol", [(8, 0.01), (4, 0.15), (3, 0.3)])
def test_rtn_quant_linear_output_close_to_float(bits, rel_tol):
    torch.manual_seed(4)
    lin = nn.Linear(256, 64)
    ql = QuantLinear.from_linear(lin, QuantScheme(bits=bits, group_size=32))
    x = torch.randn(16, 256)
    with torch.no_grad():
        y, y_ref = ql(x), lin(x)
    rel = (y - y_ref).norm() / y_ref.norm()
    assert rel < rel_tol
    # and more bits are strictly better (checks the error ordering, not just a threshold)
    if bits < 8:
        q8 = QuantLinear.from_linear(lin, QuantScheme(bits=8, group_size=32))
        with torch.no_grad():
            assert (q8(x) - y_ref).norm() < (y - y_ref).norm()


def test_from_linear_with_given_qparams_and_q():
    """GPTQ's entry point: its own q/scale/zero are stored unchanged."""
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False)
    lin = nn.Linear(32, 16, bias=False)
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (16, 32), generator=g, dtype=torch.int8)
    scale = torch.rand(16, 2, generator=g) + 0.1
    zero = torch.randint(0, 16, (16, 2), generator=g, dtype=torch.int32)
    ql = QuantLinear.from_linear(lin, scheme, scale=scale, zero=zero, q=q)
    assert torch.equal(ql.q_values(), q) and torch.equal(ql.zero_point(), zero)
    assert torch.equal(ql.dequantize(), dequantize(q, scale, zero, scheme))
    # scale only: q = quantize(weight, scale, zero)
    ql2 = QuantLinear.from_linear(lin, scheme, scale=scale, zero=zero)
    assert torch.equal(ql2.q_values(), quantize(lin.weight, scale, zero, scheme))


def test_set_quantized_rejects_inconsistent_tensors():
    scheme = QuantScheme(bits=4, group_size=16)
    ql = QuantLinear(32, 8, scheme)
    ok_q = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="q has shape"):
        ql.set_quantized(torch.zeros(8, 30, dtype=torch.int8), torch.ones(8, 2), None)
    with pytest.raises(ValueError, match="scale has shape"):
        ql.set_quantized(ok_q, torch.ones(8, 1), None)
    with pytest.raises(ValueError, match="zero must be None"):
        ql.set_quantized(ok_q, torch.ones(8, 2), torch.zeros(8, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"q values must lie in \[-8, 7\]"):
        ql.set_quantized(ok_q + 8, torch.ones(8, 2), None)
    with pytest.raises(ValueError, match="without its scale"):
        QuantLinear.from_linear(nn.Linear(32, 8), scheme, q=ok_q)


def test_dtype_casts_keep_the_stored_tensors():
    ql = QuantLinear.from_linear(nn.Linear(64, 16), QuantScheme(bits=4, symmetric=False))
    packed, scale, zero = ql.weight_packed.clone(), ql.weight_scale.clone(), ql.weight_zero_point
    ql = ql.to(torch.bfloat16)
    assert ql.dtype == torch.bfloat16 and ql.bias.dtype == torch.bfloat16
    assert torch.equal(ql.weight_packed, packed) and torch.equal(ql.weight_scale, scale)
    assert torch.equal(ql.weight_zero_point, zero)
    no_bias = QuantLinear.from_linear(nn.Linear(64, 16, bias=False), QuantScheme()).half()
    assert no_bias.dtype == torch.float16 and no_bias.weight_scale.dtype == torch.float32


def test_check_tensors_catches_corruption():
    ql = QuantLinear.from_linear(nn.Linear(64, 16), QuantScheme(bits=3, symmetric=False))
    ql.check_tensors()
    bad = ql.weight_packed.clone()
    ql.weight_packed[0, 0] = 0xFF  # code 15 > 7 for 3-bit
    with pytest.raises(ValueError, match="outside"):
        ql.check_tensors()
    ql.weight_packed.copy_(bad)
    ql.weight_zero_point[0, 0] = 9
    with pytest.raises(ValueError, match="weight_zero_point"):
        ql.check_tensors()
    ql.weight_zero_point[0, 0] = 0
    ql.weight_scale[1, 0] = float("nan")
    with pytest.raises(ValueError, match="weight_scale"):
        ql.check_tensors()


# ---- model surgery -------------------------------------------------------------------------------


def test_quantize_model_replaces_named_linears_in_place():
    model = tiny_model(seed=0)
    ids = random_ids(128, 2, 12)
    with torch.no_grad():
        dense = model(ids)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    scheme = QuantScheme(bits=8)
    quantize_model(model, dict.fromkeys(names, scheme))
    assert quantization_modules(model) == dict.fromkeys(names, scheme)
    assert isinstance(model.lm_head, nn.Linear)
    with torch.no_grad():
        quant = model(ids)
    assert not torch.equal(quant, dense)
    # int8 RTN barely moves the logits of a random model
    assert (quant - dense).abs().max() < 0.05 * dense.abs().max()


def test_quantize_model_errors():
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match="no module named 'model.nope'"):
        quantize_model(model, {"model.nope": QuantScheme()})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        quantize_model(model, {"model.norm": QuantScheme()})
    with pytest.raises(ValueError, match="up_proj: group_size 48 does not divide"):
        quantize_model(model, {"model.layers.0.mlp.up_proj": QuantScheme(bits=4, group_size=48)})
    with pytest.raises(ValueError, match="lm_head stays dense"):
        quantize_model(model, {"lm_head": QuantScheme()})
    tied = tiny_model(seed=0, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="shares its weight"):
        quantize_model(tied, {"lm_head": QuantScheme()})
    with pytest.raises(ValueError, match="no module named"):
        replace_linear(model, "model.layers.9.mlp", nn.Identity())
