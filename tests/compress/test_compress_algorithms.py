"""GPTQ, AWQ and SmoothQuant math on real calibration activations of a tiny model.

References: GPTQ's lazy block updates must equal the column-by-column algorithm; its error must
be below RTN's on the activations it saw; AWQ and SmoothQuant scalings, before any rounding, must
leave a float64 model's logits unchanged.
"""

from __future__ import annotations

import copy

import torch
from compress_helpers import tiny_model, tiny_texts

from fastserve.compress.calibration import LayerWalker, capture_inputs
from fastserve.compress.quant.awq import awq_scale_layer, clip_weight
from fastserve.compress.quant.gptq import HessianAccumulator, gptq_quantize
from fastserve.compress.quant.smoothquant import smooth_layer
from fastserve.data.tokenizer import Tokenizer
from fastserve.model.quantized import QuantScheme, compute_qparams, dequantize, fake_quantize


def _calib_ids(num_samples: int = 16, seq_len: int = 64) -> tuple[torch.Tensor, int]:
    from fastserve.compress.calibration import load_calibration

    tok = Tokenizer.train(tiny_texts(200), vocab_size=300)
    ids = load_calibration(torch.tensor([[0]]), tok)  # tensor passthrough
    assert ids.shape == (1, 1)
    text = torch.tensor(
        [t for doc in tok.encode_batch(tiny_texts(80, seed=3)) for t in doc], dtype=torch.int64
    )
    n = num_samples * seq_len
    return text[:n].reshape(num_samples, seq_len), tok.vocab_size


def _layer_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, inputs [n, in]) of a linear of layer 1, on real text through the tiny model."""
    ids, vocab = _calib_ids()
    model = tiny_model(vocab_size=vocab)
    walker = LayerWalker(model, ids)
    walker.advance(walker.layer(0))
    layer = walker.layer(1)
    xs = []
    with capture_inputs({name: layer.get_submodule(name)}, lambda _n, a: xs.append(a[0])):
        walker.run_all(layer)
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
    return layer.get_submodule(name).weight.detach().clone(), x


def _out_err(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - wq).T).pow(2).sum())


def test_gptq_beats_rtn_on_real_activations_and_reports_its_error():
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        w, x = _layer_inputs(name)
        acc = HessianAccumulator(w.shape[1])
        for chunk in x.split(100):
            acc.add(chunk)
        h = acc.hessian()
        torch.testing.assert_close(h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
        for scheme in (QuantScheme(4, 128, False), QuantScheme(3, 128, False), QuantScheme(8)):
            for act_order in (False, True):
                res = gptq_quantize(w, h, scheme, act_order=act_order)
                wq = dequantize(res.q, res.scale, res.zero, scheme)
                gptq_err = _out_err(w, wq, x)
                rtn_err = _out_err(w, fake_quantize(w, scheme), x)
                assert gptq_err < 0.8 * rtn_err, (name, scheme, act_order, gptq_err, rtn_err)
                measured = gptq_err / float((x @ w.T).pow(2).sum())
                assert abs(res.error - measured) < 1e-3 * measured + 1e-9


def test_gptq_lazy_blocks_equal_column_by_column():
    w, x = _layer_inputs("mlp.gate_proj")
    h = 2 * x.T @ x / x.shape[0]
    for scheme, act_order in ((QuantScheme(4, 32, True), False), (QuantScheme(4, 32, False), True)):
        lazy = gptq_quantize(w, h, scheme, block_size=48, act_order=act_order)
        plain = gptq_quantize(w, h, scheme, block_size=1, act_order=act_order)
        mismatch = (lazy.q != plain.q).float().mean().item()
        assert mismatch < 1e-3  # float reassociation may flip a rare exact tie
        torch.testing.assert_close(lazy.scale, plain.scale, rtol=1e-5, atol=1e-7)


def test_gptq_act_order_uses_static_groups_in_original_order():
    w, x = _layer_inputs("self_attn.o_proj")
    h = 2 * x.T @ x / x.shape[0]
    scheme = QuantScheme(4, 32, False)
    res = gptq_quantize(w, h, scheme, act_order=True)
    scale, zero = compute_qparams(w, scheme)
    torch.testing.assert_close(res.scale, scale)
    assert torch.equal(res.zero, zero)
    assert res.q.dtype == torch.int8 and int(res.q.min()) >= 0 and int(res.q.max()) <= 15


def test_gptq_dead_inputs_get_zero_weight():
    w, x = _layer_inputs("mlp.up_proj")
    x[:, :5] = 0
    h = 2 * x.T @ x / x.shape[0]
    res = gptq_quantize(w, h, QuantScheme(8), act_order=True)
    wq = dequantize(res.q, res.scale, res.zero, QuantScheme(8))
    assert torch.all(wq[:, :5] == 0)


def _float64_model_and_ids():
    ids, vocab = _calib_ids(8, 32)
    model = tiny_model(vocab_size=vocab).double()
    # Uneven channels, as trained models have: scalings then really change the weights.
    with torch.no_grad():
        for layer in model.model.layers:
            gen = torch.Generator().manual_seed(5)
            layer.input_layernorm.weight.copy_(
                torch.rand(128, generator=gen, dtype=torch.float64) * 3
            )
    return model, ids


def _scale_all_layers(model, ids, fn):
    walker = LayerWalker(model, ids)
    for idx in range(walker.num_layers):
        layer = walker.layer(idx)
        fn(layer, lambda layer=layer: walker.run_all(layer))
        walker.advance(layer)


def test_smoothquant_scaling_preserves_logits_float64():
    model, ids = _float64_model_and_ids()
    ref = model(ids).detach()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    targets = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.o_proj",
        "mlp.down_proj",
    ]
    scales = {}
    _scale_all_layers(
        model, ids, lambda layer, run: scales.update(smooth_layer(layer, run, targets))
    )
    assert set(scales) == {"input_layernorm", "post_attention_layernorm"}
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, before)
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=1e-4)


def test_awq_scaling_preserves_logits_float64():
    model, ids = _float64_model_and_ids()
    ref = model(ids).detach()
    scheme = QuantScheme(4, 32, False)
    targets = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    found = []
    _scale_all_layers(
        model, ids, lambda layer, run: found.append(awq_scale_layer(layer, run, targets, scheme))
    )
    # every group is scaled, v->o too under grouped-query attention (4 heads, 2 kv heads): the
    # o_proj channels that read one v channel share its scale
    assert set(found[0]) == {
        "input_layernorm",
        "self_attn.v_proj",
        "post_attention_layernorm",
        "mlp.up_proj",
    }
    attn = model.model.layers[0].self_attn
    groups = attn.num_heads // attn.num_kv_heads
    s_o = found[0]["self_attn.v_proj"].view(attn.num_kv_heads, groups, attn.head_dim)
    assert torch.equal(s_o, s_o[:, :1].expand_as(s_o))
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in found[0].values())
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=1e-4)


def test_clip_search_never_worse_than_no_clipping():
    w, x = _layer_inputs("mlp.down_proj")
    scheme = QuantScheme(4, 64, False)
    clipped = clip_weight(w, x[:512], scheme)
    assert torch.all(clipped.abs() <= w.abs() + 1e-7)
    err_clip = _out_err(w, fake_quantize(clipped, scheme), x[:512])
    err_rtn = _out_err(w, fake_quantize(w, scheme), x[:512])
    assert err_clip <= err_rtn


def _brute_force_clip(w, x, scheme, clip_grid=20, max_shrink=0.5):
    """clip_weight's search written out one (row, group) and one range at a time."""
    g = scheme.group_size
    steps = [1 - i / clip_grid for i in range(int(max_shrink * clip_grid))]
    out = w.clone()
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            wg, xg = w[r, c0 : c0 + g], x[:, c0 : c0 + g]
            if scheme.symmetric:
                ranges = [(wg.abs().max() * f, -wg.abs().max() * f) for f in steps]
            else:
                hi0, lo0 = wg.max().clamp(min=0), wg.min().clamp(max=0)
                ranges = [(hi0 * f, lo0 * e) for f in steps for e in steps]
            best = None
            for hi, lo in ranges:
                wc = wg.clamp(min=lo, max=hi)
                q = fake_quantize(wc[None], QuantScheme(scheme.bits, None, scheme.symmetric))[0]
                err = float((xg @ (q - wg)).pow(2).mean())
                if best is None or err < best[0]:
                    best = (err, wc)
            out[r, c0 : c0 + g] = best[1]
    return out


def _group_errs(w, wc, x, scheme):
    q = fake_quantize(wc, scheme)
    g = scheme.group_size
    xg, dg = x.reshape(x.shape[0], -1, g), (q - w).reshape(w.shape[0], -1, g)
    return torch.einsum("ngk,rgk->nrg", xg, dg).pow(2).mean(0)


def test_clip_search_equals_brute_force_and_asymmetric_ranges_are_lopsided():
    w, x = _layer_inputs("mlp.down_proj")
    w, x = w[:6].double(), x[:300].double()
    for symmetric in (True, False):
        scheme = QuantScheme(4, 64, symmetric)
        got = clip_weight(w, x, scheme, rows_per_chunk=4)
        want = _brute_force_clip(w, x, scheme)
        # the same optimum per (row, group): equal errors (a near-tie may pick either range)
        torch.testing.assert_close(_group_errs(w, got, x, scheme), _group_errs(w, want, x, scheme))
        assert torch.isclose(got, want, rtol=1e-5, atol=1e-7).float().mean() > 0.99
        if symmetric:
            continue
        # some groups keep one end whole and shrink the other: a shared bound could not do that
        wg, gg = w.reshape(6, -1, 64), got.reshape(6, -1, 64)
        hi_kept = torch.isclose(gg.amax(-1), wg.amax(-1))
        lo_kept = torch.isclose(gg.amin(-1), wg.amin(-1))
        assert bool((hi_kept ^ lo_kept).any())


def test_awq_scale_search_never_worse_than_rtn_on_its_calibration():
    """s = 1 is always a candidate, so with duo scaling (whose alpha = 0 is not s = 1) the chosen
    scales give at most RTN's MLP output error on the inputs searched."""
    model, ids = _float64_model_and_ids()
    walker = LayerWalker(model, ids)
    layer = walker.layer(0)
    scheme = QuantScheme(4, 32, False)

    def mlp_inputs():
        xs = []
        with capture_inputs({"mlp": layer.mlp}, lambda _n, a: xs.append(a[0])):
            walker.run_all(layer)
        return torch.cat(xs)

    def quantized_mlp_err(x, x_ref, ref_mlp):
        mlp = copy.deepcopy(layer.mlp)
        with torch.no_grad():
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight.copy_(fake_quantize(lin.weight, scheme))
            return float((mlp(x) - ref_mlp(x_ref)).pow(2).sum())

    x0, ref_mlp = mlp_inputs(), copy.deepcopy(layer.mlp)
    err_rtn = quantized_mlp_err(x0, x0, ref_mlp)
    targets = ["mlp.gate_proj", "mlp.up_proj"]
    # num_grid=1: the grid holds only alpha = 0, s = 1 / mean|w| (a weight-only scale)
    scales = awq_scale_layer(layer, lambda: walker.run_all(layer), targets, scheme, num_grid=1)
    x1 = mlp_inputs()
    torch.testing.assert_close(x1 * scales["post_attention_layernorm"], x0)
    assert quantized_mlp_err(x1, x0, ref_mlp) <= err_rtn * (1 + 1e-9)
