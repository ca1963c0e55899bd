"""Pruning math on real calibration activations of a tiny model (the helpers of
test_compress_algorithms): SparseGPT < Wanda < magnitude in layer output error, SparseGPT at 0%
is the dense layer, SparseGPT reports its error, and GPTQ after pruning keeps the mask."""

from __future__ import annotations

import pytest
import torch
from test_compress_algorithms import _layer_inputs

from fastserve.compress.prune.magnitude import magnitude_mask
from fastserve.compress.prune.sparsegpt import sparsegpt_prune
from fastserve.compress.prune.wanda import SquaredNormAccumulator, wanda_mask
from fastserve.compress.quant.gptq import HessianAccumulator, gptq_quantize
from fastserve.model.quantized import QuantScheme, dequantize


@pytest.fixture(scope="module")
def inputs():
    """{linear: (weight, its calibration inputs [n, in], H)} for layer 1 of the tiny model; o_proj
    and down_proj read activations whose channel norms vary (the case Wanda is for)."""
    out = {}
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        w, x = _layer_inputs(name)
        acc = HessianAccumulator(w.shape[1])
        acc.add(x)
        out[name] = (w, x, acc.hessian())
    return out


def _rel_err(w: torch.Tensor, wp: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - wp).T).pow(2).sum() / (x @ w.T).pow(2).sum())


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["50%", "2:4"])
def test_output_error_orders_sparsegpt_wanda_magnitude(inputs, nm):
    for name, (w, x, h) in inputs.items():
        sq = SquaredNormAccumulator(w.shape[1])
        for chunk in x.split(100):  # streamed like the hooks do
            sq.add(chunk)
        torch.testing.assert_close(sq.sum, x.double().pow(2).sum(0))
        mag = _rel_err(w, w.masked_fill(magnitude_mask(w, 0.5, nm), 0.0), x)
        wanda = _rel_err(w, w.masked_fill(wanda_mask(w, sq.sum, 0.5, nm), 0.0), x)
        res = sparsegpt_prune(w, h, 0.5, nm)
        sgpt = _rel_err(w, res.weight, x)
        assert sgpt < 0.85 * wanda and wanda < 0.97 * mag, (name, nm, sgpt, wanda, mag)
        assert res.error == pytest.approx(sgpt, rel=1e-3)  # its own report, from H
        assert bool((res.weight[res.mask] == 0).all()) and int(res.mask.sum()) == w.numel() // 2


def test_sparsegpt_mask_is_chosen_per_block(inputs):
    w, _, h = inputs["mlp.down_proj"]  # in_features 256: two blocks of 128
    res = sparsegpt_prune(w, h, 0.5, block_size=128)
    per_block = res.mask.reshape(w.shape[0], 2, 128).sum(dim=(0, 2))
    assert per_block.tolist() == [w.shape[0] * 64] * 2  # each block its exact share ...
    assert len(set(res.mask.sum(dim=1).tolist())) > 1  # ... spread unevenly over the rows


def test_sparsegpt_at_zero_sparsity_is_the_dense_layer(inputs):
    for w, _, h in inputs.values():
        res = sparsegpt_prune(w, h, 0.0)
        assert torch.equal(res.weight, w) and not bool(res.mask.any()) and res.error == 0.0


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_after_pruning_keeps_the_mask(inputs, act_order):
    w, x, h = inputs["mlp.down_proj"]
    pruned = sparsegpt_prune(w, h, 0.5, (2, 4))
    for scheme in (QuantScheme(4, 128, False), QuantScheme(8)):
        res = gptq_quantize(pruned.weight, h, scheme, act_order=act_order, pruned=pruned.mask)
        wq = dequantize(res.q, res.scale, res.zero, scheme)
        assert bool((wq[pruned.mask] == 0).all()), scheme
        free = gptq_quantize(pruned.weight, h, scheme, act_order=act_order)  # no mask given
        wq_free = dequantize(free.q, free.scale, free.zero, scheme)
        assert int((wq_free[pruned.mask] != 0).sum()) > 0  # without it, GPTQ refills zeros
        # keeping the mask costs little output error over the pruned float layer
        assert _rel_err(pruned.weight, wq, x) < 0.05, scheme
