"""ModelConfig: presets, overrides, validation, HF config.json in both transformers spellings."""

from __future__ import annotations

import json

import pytest

from fastserve.errors import ConfigError
from fastserve.model import LlamaForCausalLM, ModelConfig, parse_overrides, resolve_config
from fastserve.model.config import PRESETS

# (preset, vocab, param range): the contract in the docs; counts include embeddings.
PRESET_SIZES = [
    ("tiny", 4096, (0.3e6, 1.0e6)),
    ("small", 4096, (4.0e6, 6.0e6)),
    ("base", 8192, (25e6, 35e6)),
]


@pytest.mark.parametrize(("name", "vocab", "bounds"), PRESET_SIZES)
def test_preset_param_counts(name, vocab, bounds):
    model = LlamaForCausalLM(ModelConfig.preset(name, vocab_size=vocab))
    n = model.num_parameters()
    print(f"{name}: {n:,} params at vocab {vocab}")
    assert bounds[0] <= n <= bounds[1]
    c = model.config
    untied = 2 * c.vocab_size * c.hidden_size
    assert n - model.num_parameters(exclude_embeddings=True) == untied // 2
    expected_layer = (
        2 * c.hidden_size  # two norms
        + c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        + 3 * c.hidden_size * c.intermediate_size
    )
    assert n == untied + c.hidden_size + c.num_hidden_layers * expected_layer


def test_tied_counts_once():
    tied = LlamaForCausalLM(ModelConfig.preset("tiny", tie_word_embeddings=True))
    untied = LlamaForCausalLM(ModelConfig.preset("tiny"))
    assert untied.num_parameters() - tied.num_parameters() == 4096 * 64


def test_parse_overrides_types():
    got = parse_overrides(
        [
            "num_hidden_layers=4",
            "rope_theta=5e5",
            "tie_word_embeddings=true",
            "attention_bias=False",
            "eos_token_id=None",
            'rope_scaling={"rope_type": "linear", "factor": 2}',
            "torch_dtype=bfloat16",
        ]
    )
    assert got == {
        "num_hidden_layers": 4,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "eos_token_id": None,
        "rope_scaling": {"rope_type": "linear", "factor": 2},
        "torch_dtype": "bfloat16",
    }
    cfg = ModelConfig.preset("tiny", **got)
    assert cfg.num_hidden_layers == 4 and cfg.torch_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["num_layers=4"], "'num_layers'"),
        (["hidden_size"], "key=value"),
        (["=3"], "key=value"),
    ],
)
def test_parse_overrides_errors(items, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_overrides(items)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(hidden_size=65), "divisible by num_attention_heads"),
        (dict(num_key_value_heads=3), "divisible by num_key_value_heads"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(head_dim=15), "even"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(torch_dtype="int8"), "torch_dtype"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "'yarn' is not supported"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        (dict(eos_token_id=5000), "outside the vocabulary"),
    ],
)
def test_validation_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.preset("tiny", **overrides)


def test_resolve_config_preset_json_and_errors(tmp_path):
    assert resolve_config("small", vocab_size=1000).vocab_size == 1000
    ours = ModelConfig.preset("tiny", num_hidden_layers=3, rope_theta=1234.0)
    (tmp_path / "ours.json").write_text(json.dumps(ours.to_dict()))
    assert resolve_config(str(tmp_path / "ours.json")) == ours
    (tmp_path / "hf.json").write_text(json.dumps(ours.to_hf_dict()))
    assert resolve_config(str(tmp_path / "hf.json")) == ours
    # A derived head_dim follows a width override; an explicit one would stay.
    assert resolve_config(str(tmp_path / "ours.json"), hidden_size=128).head_dim == 32
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_config("huge")
    with pytest.raises(ConfigError, match="'bogus'"):
        resolve_config("tiny", bogus=1)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_config(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.preset("huge")


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
@pytest.mark.parametrize("attention_bias", [False, True])
def test_hf_dict_round_trip_and_v5_reads_it(hf, tmp_path, rope_scaling, attention_bias):
    cfg = ModelConfig.preset(
        "tiny",
        rope_theta=50000.0,
        rope_scaling=rope_scaling,
        attention_bias=attention_bias,
        eos_token_id=[1, 2],
        bos_token_id=0,
    )
    d = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(d))) == cfg
    # transformers v4 reads the top-level spelling; v5 (installed) is checked for real below.
    assert d["rope_theta"] == 50000.0 and d["rope_scaling"] == rope_scaling
    assert d["model_type"] == ("qwen2" if attention_bias else "llama")
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf_cfg = hf.AutoConfig.from_pretrained(tmp_path)
    expected = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": 50000.0}
    assert hf_cfg.rope_parameters == expected
    assert hf_cfg.head_dim == cfg.head_dim
    assert hf_cfg.num_key_value_heads == cfg.num_key_value_heads


def test_from_hf_dict_v4_spelling():
    d = ModelConfig.preset("tiny").to_hf_dict()
    d.pop("rope_parameters")
    d.update(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 3.0})
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 20000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 3.0}
    # A v5 dict with only rope_parameters.
    d = ModelConfig.preset("tiny").to_hf_dict()
    for k in ("rope_theta", "rope_scaling"):
        d.pop(k)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 321.0}
    assert ModelConfig.from_hf_dict(d).rope_theta == 321.0


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (dict(model_type="gpt2"), "unsupported architecture 'gpt2'"),
        (dict(model_type="mistral", sliding_window=16), "sliding-window"),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16), "sliding-window"),
        (dict(attention_bias=True), "o_proj"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic'"),
        (dict(partial_rotary_factor=0.5), "partial rotary"),
    ],
)
def test_from_hf_dict_rejects(changes, needle):
    d = {**ModelConfig.preset("tiny").to_hf_dict(), **changes}
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_hf_dict(d)


def test_mistral_window_covering_context_is_fine():
    d = {**ModelConfig.preset("tiny").to_hf_dict(), "model_type": "mistral", "sliding_window": 256}
    assert ModelConfig.from_hf_dict(d).max_position_embeddings == 256


def test_presets_are_valid_configs():
    for name in PRESETS:
        assert ModelConfig.preset(name).to_dict()["hidden_size"] == PRESETS[name]["hidden_size"]
