"""compress() end to end: each preset on a tiny model dir -> a dir that load_model, the generate
path and the engine serve with the same greedy tokens as the in-memory compressed model; bad
recipes and data fail before anything is written; the CLI once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from compress_helpers import assert_served_like

from fastserve.compress import PRESETS, Recipe, compress
from fastserve.errors import ConfigError, DataError

MAX_TOKENS = 12


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_end_to_end(preset, compress_model_dir, calib_file, tmp_path):
    out = tmp_path / preset
    result = compress(compress_model_dir, preset, calib_file, out, num_samples=16, seq_len=64)
    assert result.out_dir == out and len(result.layer_errors) == 2
    assert all(0 <= e < 0.5 for e in result.layer_errors)  # random init: int4 is rough
    if "gptq" in preset:
        assert len(result.linear_errors) == 14

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    recipe = Recipe.preset(preset)
    scheme = recipe.modifiers[-1].scheme
    assert (qc["bits"], qc["group_size"], qc["symmetric"], qc["act_bits"]) == (
        scheme.bits,
        scheme.group_size,
        scheme.symmetric,
        scheme.act_bits,
    )
    assert qc["recipe"] == preset and qc["ignore"] == ["lm_head"] and len(qc["modules"]) == 14
    saved = Recipe.from_dict(yaml.safe_load((out / "recipe.yaml").read_text()))
    assert saved.to_dict() == recipe.to_dict()

    assert_served_like(out, result.model, MAX_TOKENS)


def test_w8a16_logits_close_to_float():
    from compress_helpers import tiny_model

    from fastserve.compress import compress_model

    ref = tiny_model(init_std=0.02)  # the usual init scale (0.2 makes even bf16 drift 3%)
    ids = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ref(ids)
        rel = {}
        for preset in ("w8a16", "w4a16"):
            result = compress_model(tiny_model(init_std=0.02), preset, None)
            assert result.num_samples == 0 and result.layer_errors == []
            b = result.model(ids)
            rel[preset] = float((a - b).norm() / a.norm())
            if preset == "w8a16":
                assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.99
    assert rel["w8a16"] < 0.01
    assert rel["w8a16"] < rel["w4a16"] / 4  # more bits, closer logits


def _bad(recipe, calib, out, exc, match, model_dir):
    with pytest.raises(exc, match=match):
        compress(model_dir, recipe, calib, out, num_samples=4, seq_len=16)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_bad_inputs_fail_before_writing(compress_model_dir, calib_file, tmp_path):
    out = tmp_path / "sub" / "out"
    out.parent.mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("modifiers:\n  - type: QuIP\n")
    _bad(recipe, calib_file, out, ConfigError, "unknown type 'QuIP'", compress_model_dir)
    recipe.write_text("modifiers:\n  - type: GPTQ\n    bits: 5\n")
    _bad(recipe, calib_file, out, ConfigError, "bits must be one of", compress_model_dir)
    recipe.write_text("modifiers:\n  - type: RTN\n    bits: 4\n    group_size: 48\n")
    _bad(recipe, calib_file, out, ConfigError, "does not divide in_features", compress_model_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _bad("w4a16-gptq", empty, out, DataError, "empty", compress_model_dir)
    small = tmp_path / "small.txt"
    small.write_text("the cat\n")
    _bad("w4a16-gptq", small, out, DataError, "fewer than one sample", compress_model_dir)
    _bad("w4a16-gptq", None, out, ConfigError, "needs calibration data", compress_model_dir)
    _bad("w8a16", tmp_path / "nope.txt", out, DataError, "no such file", compress_model_dir)
    with pytest.raises(ConfigError, match="is the input model dir"):
        compress(compress_model_dir, "w8a16", None, compress_model_dir)
    assert "quantization_config" not in (compress_model_dir / "config.json").read_text()


def test_calibration_from_shards_and_builtin(compress_model_dir, calib_file, tmp_path):
    from fastserve.compress.calibration import load_calibration
    from fastserve.data import Tokenizer, load_corpus, write_shards

    tok = Tokenizer.load(compress_model_dir)
    shards = tmp_path / "shards"
    write_shards(load_corpus([str(calib_file)]), tok, shards, progress=False)
    a = load_calibration(shards, tok, num_samples=6, seq_len=32, seed=1)
    assert a.shape == (6, 32) and torch.equal(a, load_calibration(shards, tok, 6, 32, seed=1))
    b = load_calibration(calib_file, tok, num_samples=6, seq_len=32)
    assert b.shape == (6, 32) and int(b.max()) < tok.vocab_size
    other = Tokenizer.train(["something else entirely " * 50] * 20, vocab_size=280)
    with pytest.raises(DataError, match="different tokenizer"):
        load_calibration(shards, other, 6, 32)
    c = load_calibration("builtin:stdlib", tok, num_samples=2, seq_len=64)
    assert c.shape == (2, 64)


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_compress_then_generate(compress_model_dir, calib_file, tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    out = tmp_path / "cli-gptq"

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "fastserve", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    proc = cli(
        "compress",
        str(compress_model_dir),
        "--recipe",
        "w4a16-gptq",
        "--calib",
        str(calib_file),
        "--out",
        str(out),
        "--num-samples",
        "8",
        "--seq-len",
        "32",
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (out / "recipe.yaml").is_file()
    proc = cli(
        "generate",
        "--model",
        str(out),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the cat")
    bad = cli("compress", str(compress_model_dir), "--recipe", "w5", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "neither a preset" in bad.stderr and not (tmp_path / "x").exists()
