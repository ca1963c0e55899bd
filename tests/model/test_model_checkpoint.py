"""save_model / load_model: HF layout both ways, sharding, dtype, atomicity and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_helpers import make_pair, max_diff, random_ids, tiny_model
from safetensors.torch import load_file, save_file

from fastserve.errors import CheckpointError, ConfigError
from fastserve.model import load_model, save_model
from fastserve.model.checkpoint import INDEX_FILE, WEIGHTS_FILE, load_state_dict_file

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
VARIANTS = {
    "gqa_untied": dict(),
    "mha_tied_linear": dict(
        num_key_value_heads=4,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "bias_llama3": dict(attention_bias=True, rope_scaling=LLAMA3, rope_theta=500000.0),
}


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


class FakeTokenizer:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_pretrained(self, path):
        if self.fail:
            raise RuntimeError("disk full")
        (Path(path) / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_dir_loads_in_hf_and_back(hf, tmp_path, variant):
    ours = tiny_model(**VARIANTS[variant], bos_token_id=0, eos_token_id=1)
    ids = random_ids(128, 2, 40)
    save_model(ours, tmp_path / "m", tokenizer=FakeTokenizer())
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", WEIGHTS_FILE, "generation_config.json", "tokenizer.json"} <= names
    stored = load_file(tmp_path / "m" / WEIGHTS_FILE)
    assert ("lm_head.weight" in stored) == (not ours.config.tie_word_embeddings)

    hf_model, info = hf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "m", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected_cls = "Qwen2ForCausalLM" if ours.config.attention_bias else "LlamaForCausalLM"
    assert type(hf_model).__name__ == expected_cls
    assert max_diff(logits(hf_model.eval(), ids), logits(ours, ids)) <= 1e-4

    back = load_model(tmp_path / "m")
    assert back.config == ours.config and not back.training
    assert max_diff(logits(back, ids), logits(ours, ids)) == 0.0
    if ours.config.tie_word_embeddings:
        assert back.lm_head.weight is back.model.embed_tokens.weight


@pytest.mark.parametrize(
    "case", ["qwen2_bias_tied", "mistral_no_window", "llama_rope_llama3_head_dim"]
)
def test_hf_save_pretrained_loads_here(hf, tmp_path, case):
    hf_model, _ = make_pair(hf, case, seed=3)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = random_ids(128, 2, 40, seed=1)
    assert max_diff(logits(ours, ids), logits(hf_model, ids)) <= 1e-4


def test_sharded_round_trip(hf, tmp_path):
    ours = tiny_model(seed=5)
    save_model(ours, tmp_path / "m", max_shard_size_bytes=40_000)
    index = json.loads((tmp_path / "m" / INDEX_FILE).read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 3 and not (tmp_path / "m" / WEIGHTS_FILE).exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(ours.state_dict())
    sd = load_state_dict_file(tmp_path / "m")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    ids = random_ids(128, 1, 30)
    assert max_diff(logits(load_model(tmp_path / "m"), ids), logits(ours, ids)) == 0.0
    hf_model = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert max_diff(logits(hf_model, ids), logits(ours, ids)) <= 1e-4


def test_bf16_load_and_save(tmp_path):
    ours = tiny_model(seed=2)
    save_model(ours, tmp_path / "m")
    bf = load_model(tmp_path / "m", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert bf.config.torch_dtype == "bfloat16"
    ids = random_ids(128, 1, 20)
    ref = logits(ours, ids)
    got = logits(bf, ids)
    assert got.dtype == torch.float32
    assert max_diff(got, ref) <= 0.1 * ref.abs().max().item()
    # A bf16 dir records its dtype and loads as bf16 by default; asking for fp32 upcasts.
    save_model(bf, tmp_path / "bf")
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path / "bf").dtype == torch.bfloat16
    assert load_model(tmp_path / "bf", dtype=torch.float32).dtype == torch.float32


def test_generation_config_written(tmp_path):
    ours = tiny_model(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    save_model(ours, tmp_path / "m", generation_config={"max_new_tokens": 7})
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "max_new_tokens": 7}


def test_save_is_atomic(tmp_path):
    ours = tiny_model()
    save_model(ours, tmp_path / "m")
    before = load_file(tmp_path / "m" / WEIGHTS_FILE)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tiny_model(seed=9), tmp_path / "m", tokenizer=FakeTokenizer(fail=True))
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(ours, tmp_path / "new", tokenizer=FakeTokenizer(fail=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dir, no "new"
    after = load_file(tmp_path / "m" / WEIGHTS_FILE)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---- errors --------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    return tmp_path / "m"


def rewrite_weights(path, edit):
    tensors = load_file(path / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def test_missing_tensor(saved):
    rewrite_weights(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"
    ):
        load_model(saved)


def test_wrong_shape(saved):
    def edit(t):
        t["model.norm.weight"] = torch.ones(63)

    rewrite_weights(saved, edit)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*\(63,\), expected \(64,\)"):
        load_model(saved)


def test_unexpected_tensor_and_ignored_buffers(saved):
    def add_inv_freq(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    rewrite_weights(saved, add_inv_freq)
    load_model(saved)  # old HF checkpoints carry this buffer: ignored

    def add_bogus(t):
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)

    rewrite_weights(saved, add_bogus)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn"):
        load_model(saved)


def test_pickled_only_dir_is_refused(saved):
    (saved / WEIGHTS_FILE).rename(saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(saved)


def test_missing_dir_config_and_shard(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")
    index = {
        "metadata": {},
        "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"},
    }
    (saved / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors .* is missing"):
        load_model(saved)
    (saved / INDEX_FILE).unlink()
    (saved / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_model(saved)


def test_unsupported_architecture_dir(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unsupported architecture 'gpt_neox'"):
        load_model(saved)
    with pytest.raises(ConfigError, match="unsupported dtype"):
        config["model_type"] = "llama"
        (saved / "config.json").write_text(json.dumps(config))
        load_model(saved, dtype="int8")
