"""Structured pruning: a smaller dense model dir with the asked widths and parameter count, the
same logits in transformers, served by the engine like the in-memory pruned model; importance
ordering on calibration activations; composition with unstructured pruning; bad widths fail
before anything is written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from compress_helpers import assert_served_like, run_cli, tiny_model

from fastserve.compress import Recipe, compress, compress_model
from fastserve.compress.calibration import LayerWalker, load_calibration
from fastserve.compress.prune.shrink import StructurePlan, pruned_widths, shrink_model
from fastserve.compress.prune.structured import collect_scores, kept_units
from fastserve.data.tokenizer import Tokenizer
from fastserve.errors import ConfigError
from fastserve.model import LlamaForCausalLM, ModelConfig, load_model

MAX_TOKENS = 12
WIDTHS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")


def _param_count(c: ModelConfig) -> int:
    """Llama parameters from the config alone (untied head, no biases)."""
    h, d = c.hidden_size, c.head_dim
    attn = h * c.num_attention_heads * d * 2 + h * c.num_key_value_heads * d * 2
    layer = attn + 3 * h * c.intermediate_size + 2 * h
    return 2 * c.vocab_size * h + h + c.num_hidden_layers * layer


def _calib_ids(model_dir, calib_file, num_samples=16, seq_len=64):
    return load_calibration(calib_file, Tokenizer.load(model_dir), num_samples, seq_len)


STRUCT_ALL = {
    "modifiers": [
        {"type": "Structured", "mlp_sparsity": 0.5, "head_sparsity": 0.5, "layer_sparsity": 0.5}
    ]
}
CASES = {  # recipe -> widths of the tiny model dir (256 channels, 4 q / 2 kv heads, 2 layers)
    "struct30": (256 - 76, 4, 2, 2),  # floor(0.3 * 256) = 76; floor(0.3 * 2) = 0 KV groups
    "all-dimensions": (128, 2, 1, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_structured_dir_loads_in_transformers_and_is_served(
    case, compress_model_dir, calib_file, tmp_path
):
    transformers = pytest.importorskip("transformers")
    recipe = "struct30" if case == "struct30" else Recipe.from_dict(STRUCT_ALL, name=case)
    out = tmp_path / case
    result = compress(compress_model_dir, recipe, calib_file, out, num_samples=16, seq_len=64)
    config = json.loads((out / "config.json").read_text())
    assert tuple(config[k] for k in WIDTHS) == CASES[case]
    assert config["head_dim"] == 32 and config["hidden_size"] == 128  # head_dim stays explicit
    assert "sparsity_config" not in config and "quantization_config" not in config
    assert result.layer_errors == [] and result.sparsity_config == {}

    # widths and parameter counts are what was asked
    loaded = load_model(out)
    before, after = result.structure["num_parameters"]
    assert before == _param_count(load_model(compress_model_dir).config)
    assert after == _param_count(loaded.config) == loaded.num_parameters()
    assert result.model.num_parameters() == after
    for layer in loaded.model.layers:
        assert layer.mlp.down_proj.in_features == CASES[case][0]
        assert layer.self_attn.q_proj.out_features == CASES[case][1] * 32
    if case == "all-dimensions":  # the layer with the lower block influence went
        bi = result.structure["block_influence"]
        assert result.structure["removed_layers"] == [min(range(2), key=lambda i: bi[i])]

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 8, 100, 3, 77, 12, 9, 61]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), loaded(ids), rtol=1e-4, atol=1e-4)
    assert_served_like(out, result.model, MAX_TOKENS, loaded=loaded)


def test_structured_then_wanda_records_the_smaller_model(compress_model_dir, calib_file, tmp_path):
    recipe = Recipe.from_dict(
        {
            "modifiers": [
                {"type": "Structured", "layer_sparsity": 0.5, "intermediate_size": 128},
                {"type": "Wanda", "sparsity": 0.5},
            ]
        }
    )
    out = tmp_path / "struct-wanda"
    result = compress(compress_model_dir, recipe, calib_file, out, num_samples=8, seq_len=32)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (1, 128)
    sc = config["sparsity_config"]
    assert sc["method"] == "wanda" and sc["global_sparsity"] == 0.5
    assert sorted({name.split(".")[2] for name in sc["modules"]}) == ["0"]  # renumbered layer
    assert len(sc["modules"]) == 7 and len(result.layer_errors) == 1
    loaded = load_model(out)
    for name, t in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert_served_like(out, result.model, MAX_TOKENS, loaded=loaded)


@torch.no_grad()
def _layer_error(model, plan, widths, walker) -> float:
    """Relative squared error of decoder layer 0's output after `plan` vs the dense layer's."""
    small = copy.deepcopy(model)
    shrink_model(small, plan, widths.config)
    err = norm = 0.0
    for x, y in walker.run(model.model.layers[0]):
        y_small = small.model.layers[0](x, walker.cos, walker.sin, None)
        err += float((y_small - y).double().pow(2).sum())
        norm += float((y - x).double().pow(2).sum())  # what the layer adds to the residual
    return err / norm


def test_dropping_low_importance_units_changes_the_layer_less(compress_model_dir, calib_file):
    model = load_model(compress_model_dir)
    ids = _calib_ids(compress_model_dir, calib_file)
    scores = collect_scores(copy.deepcopy(model), ids)[0]
    walker = LayerWalker(model, ids)
    config = model.config

    widths = pruned_widths(config, mlp_sparsity=0.3)
    drop = widths.num_channels_removed

    def channels(keep):  # layer 1 gets the same: the config holds one width
        return StructurePlan([0, 1], {0: keep, 1: keep}, {})

    best_err = _layer_error(model, channels(kept_units(scores.channels, drop)), widths, walker)
    g = torch.Generator().manual_seed(0)
    random_errs = []
    for _ in range(8):
        keep = torch.sort(torch.randperm(config.intermediate_size, generator=g)[drop:]).values
        random_errs.append(_layer_error(model, channels(keep), widths, walker))
    assert best_err < 0.7 * min(random_errs), (best_err, random_errs)

    # KV groups: make group 0 of layer 0 matter less through its values only (what the scores
    # see is the activations), then dropping it must beat dropping group 1
    d = config.head_dim
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[:d] *= 0.25
    scores = collect_scores(copy.deepcopy(model), ids)[0]
    assert int(torch.argmin(scores.kv_groups)) == 0
    widths = pruned_widths(config, head_sparsity=0.5)  # 2 KV groups: drop one
    plans = [
        StructurePlan([0, 1], {}, {0: torch.tensor([k]), 1: torch.tensor([k])}) for k in (0, 1)
    ]
    errs = [_layer_error(model, plan, widths, walker) for plan in plans]
    assert errs[1] < 0.8 * errs[0], errs  # keeping group 1 (dropping the lowest) is better


def test_a_layer_that_adds_nothing_has_zero_influence_and_goes(compress_model_dir, calib_file):
    model = load_model(compress_model_dir)
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    ids = _calib_ids(compress_model_dir, calib_file, 4, 32)
    dense_logits = model(ids[:1])
    recipe = Recipe.from_dict({"modifiers": [{"type": "Structured", "layer_sparsity": 0.5}]})
    result = compress_model(model, recipe, ids)
    assert result.structure["removed_layers"] == [1]
    assert result.structure["block_influence"][1] == pytest.approx(0.0, abs=1e-12)
    assert result.structure["block_influence"][0] > 0.01
    torch.testing.assert_close(model(ids[:1]), dense_logits)  # layer 1 did nothing anyway
    assert model.model.layers[0].self_attn.layer_idx == 0 and len(model.model.layers) == 1


def test_heads_follow_the_transformers_constraint():
    config = ModelConfig.preset(
        "tiny", hidden_size=128, num_attention_heads=8, num_key_value_heads=4
    )  # 2 query heads per KV group; kept heads must divide 128: 1, 2 or 4 groups
    widths = pruned_widths(config, head_sparsity=0.3)  # asks 3 groups: 6 heads do not fit
    assert widths.num_groups_removed == 0 and "keeping 4" in widths.note
    widths = pruned_widths(config, head_sparsity=0.5)
    assert (widths.config.num_key_value_heads, widths.config.num_attention_heads) == (2, 4)
    assert widths.config.head_dim == 16 and widths.note is None
    with pytest.raises(ConfigError, match="6 query heads, which do not divide hidden_size 128"):
        pruned_widths(config, num_key_value_heads=3)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    recipe = Recipe.from_dict({"modifiers": [{"type": "Structured", "head_sparsity": 0.3}]})
    with pytest.raises(ConfigError, match="removes nothing"):
        recipe.resolve(model)
    recipe = Recipe.from_dict(
        {"modifiers": [{"type": "Structured", "head_sparsity": 0.3, "mlp_sparsity": 0.25}]}
    )
    plan = recipe.resolve(model)
    assert "keeping 4" in recipe.fallback_note(plan)


BAD = {
    "intermediate_size: 0": "intermediate_size 0 would leave no MLP channel",
    "num_key_value_heads: 0": "num_key_value_heads 0 would leave no KV group",
    "num_hidden_layers: 0": "num_hidden_layers 0 would leave no decoder layer",
    "num_key_value_heads: 3": "num_key_value_heads 3 is more than the model's 2",
    "mlp_sparsity: 0.3\n    intermediate_size: 100": "give mlp_sparsity or intermediate_size",
    "mlp_sparsity: 1.0": "mlp_sparsity must be a number in",
    "layer_sparsity: 0.0": "removes nothing from this model",
    "mlp_sparsity: 0.3\n    targets: [down_proj]": "leave targets and ignore at their defaults",
}


def test_bad_structured_recipes_fail_before_writing(compress_model_dir, calib_file, tmp_path):
    out = tmp_path / "sub" / "out"
    out.parent.mkdir()
    recipe = tmp_path / "r.yaml"
    bodies = {f"  - type: Structured\n    {b}\n": m for b, m in BAD.items()}
    bodies["  - type: Wanda\n  - type: Structured\n    mlp_sparsity: 0.3\n"] = (
        "modifier 2 \\(Structured\\) must be the first modifier"
    )
    for body, match in bodies.items():
        recipe.write_text("modifiers:\n" + body)
        with pytest.raises(ConfigError, match=match):
            compress(compress_model_dir, recipe, calib_file, out, num_samples=4, seq_len=16)
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(ConfigError, match="needs calibration data"):
        compress(compress_model_dir, "struct30", None, out)
    assert not out.exists()


def test_in_memory_model_matches_a_rebuilt_one(calib_file, compress_model_dir):
    """The in-place surgery gives the model a fresh LlamaForCausalLM of the new config would
    have: same state-dict names and shapes, and the same logits once loaded into one."""
    model = tiny_model(Tokenizer.load(compress_model_dir))
    ids = _calib_ids(compress_model_dir, calib_file, 4, 32)
    compress_model(model, Recipe.from_dict(STRUCT_ALL), ids)
    fresh = LlamaForCausalLM(model.config)
    state = model.state_dict()
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in state.items()
    }
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(ids[:1]), model(ids[:1]), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_compress_struct30_then_eval_and_generate(compress_model_dir, calib_file, tmp_path):
    """The user's path: `fastserve compress --recipe struct30`, then `fastserve eval` and
    `fastserve generate` on the smaller dir, as real processes."""
    out = tmp_path / "cli-struct30"
    proc = run_cli(
        *("compress", str(compress_model_dir), "--recipe", "struct30", "--calib", str(calib_file)),
        *("--out", str(out), "--num-samples", "8", "--seq-len", "32"),
    )
    assert proc.returncode == 0, proc.stderr
    dense, pruned = load_model(compress_model_dir), load_model(out)
    assert pruned.config.intermediate_size == CASES["struct30"][0]
    assert f"{dense.num_parameters() / 1e6:.2f}M -> {pruned.num_parameters() / 1e6:.2f}M" in (
        proc.stdout
    )

    results = tmp_path / "struct30.json"
    proc = run_cli(
        *("eval", str(out), "--ref", str(compress_model_dir), "--data", str(calib_file)),
        *("--context-len", "64", "--stride", "64", "--output", str(results)),
    )
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(results.read_text())["datasets"][0]
    assert entry["fidelity"]["kld_mean"] > 0  # a smaller model is not the same model
    assert entry["perplexity"]["ppl"] > 1

    proc = run_cli("generate", "--model", str(out), "--prompt", "the cat", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the cat")
