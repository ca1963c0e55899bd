"""Pruning end to end: each pruning preset and [SparseGPT 2:4 + GPTQ w4a16] on a tiny model dir
-> a smaller dir that load_model rebuilds exactly and that the generate path and the engine serve
with the in-memory pruned model's greedy tokens; bad recipes fail before anything is written; the
CLI once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from compress_helpers import assert_served_like, run_cli

from fastserve.compress import Recipe, compress
from fastserve.compress.recipe import SPARSE_PRESETS
from fastserve.errors import ConfigError
from fastserve.model import load_model
from fastserve.model.quantized import QuantLinear
from fastserve.model.sparse import nm_violations

MAX_TOKENS = 12
EXAMPLES = Path(__file__).parents[2] / "examples" / "recipes"


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.mark.parametrize("preset", list(SPARSE_PRESETS))
def test_sparse_preset_end_to_end(preset, compress_model_dir, calib_file, tmp_path):
    out = tmp_path / preset
    result = compress(compress_model_dir, preset, calib_file, out, num_samples=16, seq_len=64)
    assert len(result.layer_errors) == 2 and all(0 <= e < 1.5 for e in result.layer_errors)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    sc = config["sparsity_config"]
    structure = Recipe.preset(preset).modifiers[0].mask_structure
    assert sc["recipe"] == preset and sc["sparsity_structure"] == structure
    assert sc["global_sparsity"] == 0.5 and len(sc["modules"]) == 14
    saved = Recipe.from_dict(yaml.safe_load((out / "recipe.yaml").read_text()))
    assert saved.to_dict() == Recipe.preset(preset).to_dict()
    if "sparsegpt" in preset:
        assert len(result.linear_errors) == 14  # SparseGPT reports each linear's error

    loaded = load_model(out)  # the bitmask dir rebuilds the pruned weights exactly
    for name, t in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    # bitmask + packed values: 4 bytes per kept weight + 1 bit per weight (+ offsets)
    assert _weights_bytes(out) < 0.65 * _weights_bytes(compress_model_dir)
    assert_served_like(out, result.model, MAX_TOKENS, loaded=loaded)


def test_sparsegpt_2of4_then_gptq_w4a16(compress_model_dir, calib_file, tmp_path):
    out = tmp_path / "2of4-w4"
    recipe = EXAMPLES / "2of4-sparsegpt-w4a16.yaml"
    result = compress(compress_model_dir, recipe, calib_file, out, num_samples=16, seq_len=64)
    config = json.loads((out / "config.json").read_text())
    qc, sc = config["quantization_config"], config["sparsity_config"]
    assert qc["method"] == "gptq" and qc["bits"] == 4 and len(qc["modules"]) == 14
    assert sc["method"] == "sparsegpt" and sc["sparsity_structure"] == "2:4"
    assert {m["format"] for m in sc["modules"].values()} == {"dense"}  # stored as int4
    loaded = load_model(out)
    for name in sc["modules"]:
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        assert nm_violations(layer.dequantize() != 0, 2, 4) == 0, name  # GPTQ kept the mask
    assert_served_like(out, result.model, MAX_TOKENS, loaded=loaded)


def _bad(recipe, out, match, model_dir, calib):
    with pytest.raises(ConfigError, match=match):
        compress(model_dir, recipe, calib, out, num_samples=4, seq_len=16)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_bad_pruning_recipes_fail_before_writing(compress_model_dir, calib_file, tmp_path):
    out = tmp_path / "sub" / "out"
    out.parent.mkdir()
    recipe = tmp_path / "r.yaml"
    cases = {
        "  - type: Wanda\n    sparsity: 1.0\n": "sparsity must be a number in",
        "  - type: SparseGPT\n    sparsity: -0.5\n": "sparsity must be a number in",
        "  - type: SparseGPT\n    mask_structure: '4:2'\n": "mask_structure '4:2'",
        "  - type: Wanda\n    targets: [gate_projection]\n": "match no linear",
        "  - type: Magnitude\n    mask_structure: '2:3'\n    sparsity: null\n": "divisible by 3",
    }
    for body, match in cases.items():
        recipe.write_text("modifiers:\n" + body)
        _bad(recipe, out, match, compress_model_dir, calib_file)
    _bad("sparse50-wanda", out, "needs calibration data", compress_model_dir, None)


def test_magnitude_needs_no_data(compress_model_dir, tmp_path):
    recipe = Recipe.from_dict({"modifiers": [{"type": "Magnitude", "scope": "global"}]})
    result = compress(compress_model_dir, recipe, None, tmp_path / "mag")
    assert result.num_samples == 0 and result.layer_errors == []
    sc = json.loads((tmp_path / "mag" / "config.json").read_text())["sparsity_config"]
    assert sc["global_sparsity"] == 0.5 and sc["method"] == "magnitude"


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_compress_sparse50_wanda_then_generate(compress_model_dir, calib_file, tmp_path):
    out = tmp_path / "cli-wanda"

    proc = run_cli(
        *("compress", str(compress_model_dir), "--recipe", "sparse50-wanda"),
        *("--calib", str(calib_file), "--out", str(out), "--num-samples", "8", "--seq-len", "32"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "sparsity_config" in (out / "config.json").read_text()
    proc = run_cli("generate", "--model", str(out), "--prompt", "the cat", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the cat")
