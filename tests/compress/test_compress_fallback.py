"""group_size_fallback: the int4/int3 presets on models whose widths 128 does not divide.

hidden 64 (q/k/v/o, gate/up: groups of 128 -> 64), intermediate 96 = 32 * 3 (down_proj -> 32) and
176 = 16 * 11 (down_proj -> per-channel). Each preset compresses both, the dir loads back and
serves the in-memory model's greedy tokens, config.json records the per-linear schemes; an
explicit recipe with the same group size and no flag still fails before any write."""

from __future__ import annotations

import json

import pytest
import torch
from compress_helpers import assert_served_like

from fastserve.compress import Recipe, compress, compress_model
from fastserve.errors import ConfigError
from fastserve.model import load_model
from fastserve.model.quantized import QuantLinear, QuantScheme

FALLBACK_PRESETS = ["w4a16", "w4a16-gptq", "w4a16-awq", "w3a16-gptq"]
DOWN_GROUP = {96: 32, 176: None}  # down_proj's group size after the fallback from 128
MAX_TOKENS = 10
W4_YAML = "modifiers:\n  - type: GPTQ\n    bits: 4\n    group_size: {g}\n    symmetric: false\n"


def _model(intermediate: int, vocab_size: int = 300, ids: dict | None = None, hidden: int = 64):
    from fastserve.model import LlamaForCausalLM, ModelConfig

    config = ModelConfig.preset(
        "tiny",
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked logits: greedy paths practically never tie
        **(ids or {}),
    )
    model = LlamaForCausalLM(config)
    model.init_weights(seed=1)
    return model


@pytest.fixture(scope="module")
def fallback_dirs(compress_model_dir, tmp_path_factory):
    """{intermediate: model dir} with the compress fixtures' tokenizer."""
    from fastserve.data.tokenizer import Tokenizer
    from fastserve.model import save_model

    tok = Tokenizer.load(compress_model_dir)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    dirs = {}
    for inter in DOWN_GROUP:
        path = tmp_path_factory.mktemp(f"fallback{inter}") / "model"
        save_model(_model(inter, tok.vocab_size, ids), path, tokenizer=tok)
        dirs[inter] = path
    return dirs


def test_scheme_for_halves_down_to_32_then_per_channel():
    mod = Recipe.preset("w4a16-gptq").modifiers[0]
    assert mod.group_size_fallback and mod.group_size == 128
    expected = {256: 128, 128: 128, 64: 64, 192: 64, 96: 32, 1376: 32, 688: None, 176: None}
    for in_features, g in expected.items():
        assert mod.scheme_for(in_features) == QuantScheme(4, g, False), in_features
    odd = Recipe.from_dict(
        {"modifiers": [{"type": "RTN", "bits": 4, "group_size": 96, "group_size_fallback": True}]}
    ).modifiers[0]
    assert odd.scheme_for(144).group_size == 48  # 96/2 divides; 96/4 = 24 < 32 is not tried
    assert odd.scheme_for(120).group_size is None
    strict = Recipe.from_dict({"modifiers": [{"type": "RTN", "bits": 4, "group_size": 128}]})
    assert strict.modifiers[0].scheme_for(96) == QuantScheme(4, 128)  # no flag: as written
    with pytest.raises(ConfigError, match="group_size_fallback must be true or false"):
        Recipe.from_dict(
            {"modifiers": [{"type": "RTN", "bits": 4, "group_size": 64, "group_size_fallback": 1}]}
        )


@pytest.mark.parametrize("inter", list(DOWN_GROUP))
def test_resolve_gives_each_target_its_scheme_and_explicit_recipes_still_fail(inter, tmp_path):
    with torch.device("meta"):
        model = _model(inter)
    for preset in FALLBACK_PRESETS:
        recipe = Recipe.preset(preset)
        (targets,) = recipe.resolve(model)
        assert len(targets) == 14
        for t in targets:
            g = DOWN_GROUP[inter] if t.local_name == "mlp.down_proj" else 64
            assert t.scheme == recipe.modifiers[0].scheme_for(t.in_features)
            assert t.scheme.group_size == g and t.scheme.bits == recipe.modifiers[0].bits
    for g, bad in ((128, "model.layers.0.self_attn.q_proj"), (64, "model.layers.0.mlp.down_proj")):
        path = tmp_path / f"g{g}.yaml"
        path.write_text(W4_YAML.format(g=g))
        with pytest.raises(ConfigError, match=f"{bad}: group_size {g} does not divide"):
            Recipe.load(path).resolve(model)
        path.write_text(W4_YAML.format(g=g) + "    group_size_fallback: true\n")
        Recipe.load(path).resolve(model)  # the flag makes the same file work


def test_rtn_uses_the_fallback_scheme_and_logs_it(capsys):
    ref = _model(176)
    result = compress_model(_model(176), "w4a16", None, progress=True)
    err = capsys.readouterr().err
    assert "per-channel for mlp.down_proj" in err and "group_size 64 for" in err
    assert len(err.strip().splitlines()) == 1
    float_linears = dict(ref.named_modules())
    quantized = {n: m for n, m in result.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 14
    for name, q in quantized.items():
        g = None if name.endswith("down_proj") else 64
        assert q.scheme == QuantScheme(4, g, False)
        expected = QuantLinear.from_linear(float_linears[name], QuantScheme(4, g, False))
        torch.testing.assert_close(q.dequantize(), expected.dequantize(), rtol=0, atol=0)
    capsys.readouterr()
    compress_model(_model(256, hidden=128), "w4a16", None, progress=True)  # 128 divides all
    assert "group_size" not in capsys.readouterr().err


@pytest.mark.parametrize("inter", list(DOWN_GROUP))
@pytest.mark.parametrize("preset", FALLBACK_PRESETS)
def test_preset_falls_back_end_to_end(preset, inter, fallback_dirs, calib_file, tmp_path):
    out = tmp_path / "out"
    result = compress(fallback_dirs[inter], preset, calib_file, out, num_samples=8, seq_len=48)
    assert all(0 <= e < 0.5 for e in result.layer_errors)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    bits = Recipe.preset(preset).modifiers[0].bits
    assert len(qc["modules"]) == 14
    for name, scheme in qc["modules"].items():
        g = DOWN_GROUP[inter] if name.endswith("mlp.down_proj") else 64
        assert scheme == QuantScheme(bits, g, False).to_dict(), name
    assert qc["group_size"] == ([32, 64] if inter == 96 else [64, None])
    assert (qc["bits"], qc["symmetric"], qc["act_bits"]) == (bits, False, None)
    assert result.quantization_config == {
        k: v for k, v in qc.items() if k in result.quantization_config
    }

    loaded = load_model(out)
    down = loaded.model.layers[1].mlp.down_proj
    assert down.scheme.group_size == DOWN_GROUP[inter]
    assert tuple(down.weight_scale.shape) == (64, inter // (DOWN_GROUP[inter] or inter))
    assert_served_like(out, result.model, MAX_TOKENS, loaded)


def test_explicit_recipe_without_flag_fails_before_writing(fallback_dirs, calib_file, tmp_path):
    recipe = tmp_path / "w4.yaml"
    recipe.write_text(W4_YAML.format(g=128))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="group_size 128 does not divide in_features 64"):
        compress(fallback_dirs[96], recipe, calib_file, out, num_samples=4, seq_len=16)
    assert not out.exists()
