"""Recipes: presets, YAML round trip, target matching, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from compress_helpers import tiny_config

from fastserve.compress.recipe import PRESETS, SPARSE_PRESETS, Recipe
from fastserve.errors import ConfigError
from fastserve.model.quantized import QuantScheme


@pytest.fixture(scope="module")
def meta_model():
    from fastserve.model import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(tiny_config())


def test_presets_resolve_and_round_trip_through_yaml(meta_model):
    for name in PRESETS:
        recipe = Recipe.preset(name)
        again = Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))
        assert again.to_dict() == recipe.to_dict()
        plan = recipe.resolve(meta_model)
        quantized = {t.name for mod, ts in zip(recipe.modifiers, plan) if mod.quantizes for t in ts}
        assert len(quantized) == 2 * 7  # every decoder-layer linear, nothing else
        assert "lm_head" not in quantized


def test_w8a8_preset_is_smoothquant_then_w8a8_rtn():
    recipe = Recipe.preset("w8a8")
    assert [m.type for m in recipe.modifiers] == ["SmoothQuant", "RTN"]
    assert recipe.modifiers[0].alpha == 0.5
    assert recipe.modifiers[1].scheme == QuantScheme(bits=8, act_bits=8)


def test_patterns_regex_fnmatch_and_ignore(meta_model):
    recipe = Recipe.from_dict(
        {
            "modifiers": [
                {"type": "RTN", "bits": 4, "targets": ["re:.*mlp\\.(gate|up)_proj$"]},
                {
                    "type": "GPTQ",
                    "targets": ["down_proj", "model.layers.*.self_attn.o_proj"],
                    "ignore": ["model.layers.1.*"],
                },
            ]
        }
    )
    rtn, gptq = recipe.resolve(meta_model)
    assert [t.name for t in rtn] == [
        f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")
    ]
    assert [t.name for t in gptq] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.down_proj",
    ]
    assert gptq[1].layer_idx == 0 and gptq[1].local_name == "mlp.down_proj"


def _error(d, model=None) -> str:
    with pytest.raises(ConfigError) as e:
        recipe = Recipe.from_dict(d)
        if model is not None:
            recipe.resolve(model)
    return str(e.value)


def test_bad_recipes_name_the_problem(meta_model):
    assert "unknown type 'QuIP'" in _error({"modifiers": [{"type": "QuIP"}]})
    msg = _error({"modifiers": [{"type": "GPTQ", "bitz": 4}]})
    assert "unknown parameter(s) bitz" in msg and "bits" in msg
    assert "bits must be one of" in _error({"modifiers": [{"type": "RTN", "bits": 5}]})
    assert "alpha" in _error({"modifiers": [{"type": "SmoothQuant", "alpha": 2}, {"type": "RTN"}]})
    assert "duo_scaling must be" in _error({"modifiers": [{"type": "AWQ", "duo_scaling": 1}]})
    assert "quantizes nothing" in _error({"modifiers": [{"type": "SmoothQuant"}]})
    assert "non-empty list" in _error({"modifiers": []})
    msg = _error({"modifiers": [{"type": "RTN", "bits": 4, "group_size": 96}]}, meta_model)
    assert "group_size 96 does not divide in_features 128" in msg
    assert "model.layers.0.self_attn.q_proj" in msg
    msg = _error({"modifiers": [{"type": "RTN", "ignore": []}]}, meta_model)
    assert "lm_head is outside the decoder layers" in msg
    msg = _error({"modifiers": [{"type": "RTN"}, {"type": "GPTQ"}]}, meta_model)
    assert "already quantized by modifier 1" in msg
    msg = _error({"modifiers": [{"type": "RTN"}, {"type": "SmoothQuant"}]}, meta_model)
    assert "put SmoothQuant before it" in msg
    assert "match no linear" in _error(
        {"modifiers": [{"type": "RTN", "targets": ["nope"]}]}, meta_model
    )
    assert "act_bits=8 (W8A8) needs bits=8" in _error(
        {"modifiers": [{"type": "RTN", "bits": 4, "act_bits": 8}]}
    )


def test_load_preset_file_or_error(tmp_path):
    assert Recipe.load("w4a16-awq").name == "w4a16-awq"
    path = tmp_path / "mine.yaml"
    path.write_text("modifiers:\n  - type: RTN\n    bits: 4\n    group_size: 64\n")
    recipe = Recipe.load(path)
    assert recipe.name == "mine" and recipe.modifiers[0].scheme == QuantScheme(4, 64)
    with pytest.raises(ConfigError, match="neither a preset"):
        Recipe.load(tmp_path / "missing.yaml")
    path.write_text("modifiers: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read recipe"):
        Recipe.load(path)


def test_example_recipes_load_and_match_the_presets_they_name(meta_model):
    examples = sorted((Path(__file__).parents[2] / "examples" / "recipes").glob("*.yaml"))
    assert examples
    for path in examples:
        recipe = Recipe.load(path)
        recipe.resolve(meta_model)
        named = path.stem in PRESETS or path.stem in SPARSE_PRESETS
        if named:  # "Same as `--recipe <stem>`": same modifiers, same plan
            preset = Recipe.preset(path.stem)
            mods = [
                {k: v for k, v in m.to_dict().items() if k != "ignore"} for m in recipe.modifiers
            ]
            want = [
                {k: v for k, v in m.to_dict().items() if k != "ignore"} for m in preset.modifiers
            ]
            assert mods == want, path.name
            assert recipe.resolve(meta_model) == preset.resolve(meta_model), path.name
    stems = {p.stem for p in examples}
    assert set(SPARSE_PRESETS) <= stems  # every pruning preset has its example file
