"""Pruning masks and recipes: exact counts and N:M patterns in every comparison group, for every
method through compress_model; OWL's allocation; one clear ConfigError per bad parameter."""

from __future__ import annotations

import pytest
import torch
from compress_helpers import tiny_config, tiny_model

from fastserve.compress import compress_model
from fastserve.compress.prune.magnitude import global_magnitude_masks
from fastserve.compress.prune.masks import matrix_mask, nm_mask, num_to_prune, row_mask
from fastserve.compress.prune.owl import owl_sparsities
from fastserve.compress.recipe import Recipe
from fastserve.errors import ConfigError

IDS = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(0))


def test_masks_prune_exactly_floor_of_the_share_even_with_ties():
    score = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    score[:, :10] = 0.0  # ties
    for s in (0.0, 0.29, 0.5, 0.99):
        assert (row_mask(score, s).sum(dim=1) == num_to_prune(40, s)).all()
        assert int(matrix_mask(score, s).sum()) == num_to_prune(240, s)
    assert num_to_prune(100, 0.29) == 29  # not 28 (0.29 * 100 = 28.999999999999996)
    mask = nm_mask(score, 2, 8)
    assert (mask.reshape(6, 5, 8).sum(-1) == 6).all()
    # the kept entries are the largest of their group
    kept_min = score.masked_fill(mask, float("inf")).reshape(-1, 8).amin(-1)
    pruned_max = score.masked_fill(~mask, float("-inf")).reshape(-1, 8).amax(-1)
    assert bool((kept_min >= pruned_max).all())


def test_global_magnitude_ranks_all_linears_together():
    a = torch.full((4, 4), 0.1)
    b = torch.arange(1.0, 17.0).reshape(4, 4)
    masks = global_magnitude_masks({"a": a, "b": b}, 0.75)  # 24 smallest of 32
    assert bool(masks["a"].all()) and int(masks["b"].sum()) == 8
    assert int(masks["b"][:2].sum()) == 8  # the 8 smallest of b


def _zeros(model, name):
    return model.get_submodule(name).weight.detach() == 0


CASES = {
    # recipe modifier: how the zeros of each target are counted
    "magnitude-30": ({"type": "Magnitude", "sparsity": 0.3}, "matrix"),
    "magnitude-4of8": ({"type": "Magnitude", "sparsity": 0.5, "mask_structure": "4:8"}, "4:8"),
    "wanda-50": ({"type": "Wanda", "sparsity": 0.5}, "row"),
    "wanda-2of4": ({"type": "Wanda", "sparsity": None, "mask_structure": "2:4"}, "2:4"),
    "sparsegpt-60": ({"type": "SparseGPT", "sparsity": 0.6}, "matrix"),
    "sparsegpt-2of4": ({"type": "SparseGPT", "sparsity": 0.5, "mask_structure": "2:4"}, "2:4"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_has_exactly_the_requested_pattern(case):
    modifier, group = CASES[case]
    model = tiny_model()
    result = compress_model(model, Recipe.from_dict({"modifiers": [modifier]}), IDS)
    names = [t.name for t in result.recipe.resolve(model)[0]]
    assert len(names) == 14 and set(result.sparsity_config["modules"]) == set(names)
    s = result.recipe.modifiers[0].target_sparsity
    for name in names:
        zeros = _zeros(model, name)
        rows, cols = zeros.shape
        if group == "matrix":
            assert int(zeros.sum()) == num_to_prune(rows * cols, s), name
        elif group == "row":
            assert (zeros.sum(dim=1) == num_to_prune(cols, s)).all(), name
        else:
            n, m = (int(v) for v in group.split(":"))
            assert (zeros.reshape(rows, -1, m).sum(-1) == m - n).all(), name
    for name in ("lm_head", "model.embed_tokens"):
        assert not bool(_zeros(model, name).any())


def test_owl_sparsities_average_to_the_target():
    ratios = [0.01, 0.05, 0.02, 0.08, 0.03]
    sp = owl_sparsities(ratios, 0.5, 0.08)
    assert abs(sum(sp) / len(sp) - 0.5) < 1e-12
    assert max(sp) - min(sp) == pytest.approx(0.16) and sp.index(min(sp)) == 3  # most outliers
    assert owl_sparsities([0.2, 0.2], 0.7, 0.1) == pytest.approx([0.7, 0.7])  # no spread


def test_owl_through_compress_model():
    model = tiny_model()
    mod = {"type": "Wanda", "sparsity": 0.5, "sparsity_profile": "owl", "owl_lmbda": 0.1}
    result = compress_model(model, Recipe.from_dict({"modifiers": [mod]}), IDS)
    layer_sparsity = result.recipe.modifiers[0].layer_sparsities()
    assert sorted(layer_sparsity) == [0, 1]
    assert sum(layer_sparsity.values()) / 2 == pytest.approx(0.5, abs=1e-12)
    assert layer_sparsity[0] != layer_sparsity[1]
    for idx, s in layer_sparsity.items():  # each row prunes floor(s_l * cols)
        zeros = _zeros(model, f"model.layers.{idx}.mlp.up_proj")
        assert (zeros.sum(dim=1) == num_to_prune(zeros.shape[1], s)).all()


@pytest.fixture(scope="module")
def meta_model():
    from fastserve.model import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(tiny_config())


BAD = {
    "sparsity 1": (
        {"type": "Wanda", "sparsity": 1.0},
        r"sparsity must be a number in \[0.0, 1.0\)",
    ),
    "sparsity < 0": ({"type": "SparseGPT", "sparsity": -0.1}, "sparsity must be a number"),
    "N > M": ({"type": "SparseGPT", "mask_structure": "4:2"}, "mask_structure '4:2'"),
    "not N:M": ({"type": "Magnitude", "mask_structure": "half"}, "mask_structure must be"),
    "unquoted N:M": ({"type": "Wanda", "mask_structure": 124}, "quote N:M in YAML"),
    "sparsity vs N:M": (
        {"type": "Wanda", "sparsity": 0.3, "mask_structure": "2:4"},
        "does not match mask_structure 2:4",
    ),
    "owl + N:M": (
        {"type": "Wanda", "mask_structure": "2:4", "sparsity_profile": "owl"},
        "owl needs mask_structure unstructured",
    ),
    "owl range": (
        {"type": "SparseGPT", "sparsity": 0.1, "sparsity_profile": "owl"},
        "owl_lmbda 0.08",
    ),
    "profile": ({"type": "Wanda", "sparsity_profile": "wide"}, "sparsity_profile must be"),
    "scope": ({"type": "Magnitude", "scope": "model"}, "scope must be one of"),
    "block vs M": (
        {"type": "SparseGPT", "mask_structure": "3:6", "sparsity": None, "block_size": 128},
        "block_size 128 must be a multiple of M = 6",
    ),
    "unknown param": ({"type": "Wanda", "blocksize": 3}, r"unknown parameter\(s\) blocksize"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pruning_parameters_name_the_field(case):
    modifier, message = BAD[case]
    with pytest.raises(ConfigError, match=message) as e:
        Recipe.from_dict({"modifiers": [modifier]})
    assert str(e.value).startswith("recipe modifier 1 (")


def test_bad_pruning_plans_name_the_linear(meta_model):
    def error(mods):
        with pytest.raises(ConfigError) as e:
            Recipe.from_dict({"modifiers": mods}).resolve(meta_model)
        return str(e.value)

    assert "match no linear" in error([{"type": "Wanda", "targets": ["nope_proj"]}])
    msg = error([{"type": "Magnitude", "mask_structure": "2:3", "sparsity": None}])
    assert "needs in_features divisible by 3, got 128" in msg and "q_proj" in msg
    msg = error([{"type": "GPTQ", "bits": 4}, {"type": "SparseGPT"}])
    assert "put SparseGPT before it" in msg
    assert "already pruned by modifier 1" in error([{"type": "Wanda"}, {"type": "Magnitude"}])
    with pytest.raises(ConfigError, match="quantizes nothing"):
        Recipe.from_dict({"modifiers": [{"type": "SmoothQuant"}, {"type": "Wanda"}]})
    # prune then quantize the same linears is the intended composition
    Recipe.from_dict({"modifiers": [{"type": "SparseGPT"}, {"type": "GPTQ"}]}).resolve(meta_model)
